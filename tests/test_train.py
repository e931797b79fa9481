"""cca_jax.train: the full CCA step against the official one (cca_step_* fixtures), and the loop.

The parity tests take every hyper-parameter from the fixture json and the policy weights from the
matching model fixture (``llamagen_model`` / ``var_model`` of the same set and seeds).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import fixture_harness
from cca_jax import families, losses, optim, train
from configs.common import base_config

MODEL_KIND = {"cca_step_llamagen": "llamagen_model", "cca_step_var": "var_model"}
METRIC_NAMES = {"acc": "acc", "reward_margin": "reward_margin", "chosen_rew": "chosen_reward",
                "rejected_rew": "rejected_reward", "chosen_reward": "chosen_reward",
                "rejected_reward": "rejected_reward", "uncond_reward": "uncond_reward",
                "sftloss": "sft_loss", "shuffle_sftloss": "shuffle_sft_loss",
                "ref_sftloss": "ref_sft_loss", "ref_shuffle_sftloss": "ref_shuffle_sft_loss",
                "Lm": "Lm", "Lt": "Lt", "Accm": "Accm", "Acct": "Acct"}


def policy_fixture(fx):
    """The model fixture whose ``sd/*`` is the policy of cca_step fixture ``fx``."""
    seeds = fx.meta["seeds"]
    for m in fixture_harness.all_fixtures():
        if m.kind != MODEL_KIND[fx.kind] or m.meta.get("set") != fx.meta.get("set"):
            continue
        same_args = all(m.meta.get(k) == fx.meta.get(k) for k in ("model_args", "var_args", "vqvae_args"))
        ms = m.meta["seeds"]
        if same_args and all(ms.get(k) == seeds.get(k) for k in ("init_seed", "policy_perturb_seed",
                                                                  "vae_seed")):
            return m
    raise LookupError(f"no {MODEL_KIND[fx.kind]} fixture matches {fx.name} (set/args/seeds)")


def fixture_config(fx, variant: dict):
    """A config holding the fixture's model and the variant's loss, one micro-batch of size B."""
    c = base_config()
    if fx.kind == "cca_step_llamagen":
        c.model.family = "llamagen"
        c.model.update({k: v for k, v in fx.meta["model_args"].items()})
        c.loss.uncond_zero_form = "llamagen"
        B = fx.arrays["batch/c_indices"].shape[0]
    else:
        c.model.family = "var"
        va, vq = fx.meta["var_args"], fx.meta["vqvae_args"]
        for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes", "norm_eps",
                  "shared_aln", "attn_l2_norm", "cond_drop_rate", "drop_rate", "attn_drop_rate",
                  "drop_path_rate"):
            c.model[k] = va[k]
        c.model.patch_nums = tuple(va["patch_nums"])
        c.model.vocab_size, c.model.Cvae = vq["vocab_size"], vq["z_channels"]
        c.tokenizer.family = "vqvae"
        c.tokenizer.update({k: v for k, v in vq.items() if k != "test_mode"})
        c.loss.uncond_zero_form = "var"
        B = fx.arrays["batch/label_B"].shape[0]
    c.loss.type = variant["loss_type"].lower()
    c.loss.beta, c.loss.lambda_ = variant["beta"], variant["lambda_"]
    c.loss.uncond_ratio = variant["uncond_ratio"]
    c.loss.negatives, c.loss.roll_group = "group_roll", B  # the official roll over its batch
    c.train.global_batch_size = B
    c.optim.grad_accum_steps = 1
    c.mesh.fsdp = 1
    c.data.source = "synthetic"
    return c


def fixture_inputs(fx, family):
    """(policy params, reference params, aux, tokens [B, L], labels [B], TBM [B])."""
    pol_sd = policy_fixture(fx).state_dict("sd/")
    ref_sd = fx.state_dict("ref_sd/")
    if fx.kind == "cca_step_llamagen":
        from cca_jax.convert import llamagen as conv
        a = fx.arrays
        return (conv.from_state_dict(pol_sd, family.model_cfg),
                conv.from_state_dict(ref_sd, family.model_cfg), None,
                a["batch/z_indices"], a["batch/c_indices"], a["batch/TBM"])
    from cca_jax.convert import var as conv
    from cca_jax.convert import vqvae as vconv
    from cca_jax.models import vqvae
    m = policy_fixture(fx)
    vq_cfg = vqvae.VQVAEConfig.from_official_args(fx.meta["vqvae_args"])
    aux = families._quantizer_only(vconv.from_state_dict(m.state_dict("vae_sd/"), vq_cfg))
    a = fx.arrays
    return (conv.from_state_dict(pol_sd, family.model_cfg),
            conv.from_state_dict(ref_sd, family.model_cfg), aux,
            a["batch/gt_BL"], a["batch/label_B"], a["batch/TBM"])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("cca_step_llamagen", "cca_step_var"))
def test_cca_step_matches_official(fx):
    """Every variant's loss, metrics and gradients (README tolerances).

    The step's micro-batch function runs the first variant end to end (per-sample log-likelihoods,
    metrics incl. the token ones, gradients). All variants then go through one compiled
    forward+VJP of the policy log-likelihoods, pulled back with each loss's dL/dℓ.
    """
    variants = list(fx.meta["variants"].items())
    name0, v0 = variants[0]
    cfg0 = fixture_config(fx, v0)
    family = families.from_config(cfg0)
    params, ref, aux, tokens, labels, tbm = fixture_inputs(fx, family)
    tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
    B = tokens.shape[0]

    def mask_of(variant):
        return jnp.asarray(tbm if variant["uncond_ratio"] > 0 else np.zeros_like(tbm))

    opts = train.StepOptions.from_config(cfg0)
    loss, metrics, grads, extras = jax.jit(lambda p, r, u, a: train.micro_loss_and_grads(
        p, r, tokens, labels, jax.random.key(0), a, family=family, opts=opts, uncond_B=u))(
        params, ref, mask_of(v0), aux)
    _check_variant(fx, name0, family, loss, metrics, extras["policy_logp"], extras["ref_logp"],
                   grads)

    tokens2 = train._interleave(tokens, tokens)

    @jax.jit
    def logp_and_pullback(p, labels2, ct_B2, a):
        def logp(q):
            logits = family.logits(q, tokens2, labels2, train=True, rng=jax.random.key(0), aux=a)
            return losses.sequence_logp(logits, tokens2).reshape(B, 2)
        out, pull = jax.vjp(logp, p)
        return out, pull(ct_B2)[0]

    zeros = jnp.zeros((B, 2), jnp.float32)
    for name, v in variants:
        cfg = fixture_config(fx, v)
        lab = losses.build_cca_labels(labels, null_label=family.null_label, mask_B=mask_of(v),
                                      negatives="group_roll", roll_group=B)
        labels2 = train._interleave(lab.pos_B, lab.neg_B)
        ref_logp, _ = logp_and_pullback(ref, labels2, zeros, aux)
        pol_logp, _ = logp_and_pullback(params, labels2, zeros, aux)

        def loss_of(pl):
            out = losses.cca_loss(
                policy_pos_B=pl[:, 0], policy_neg_B=pl[:, 1], ref_pos_B=ref_logp[:, 0],
                ref_neg_B=ref_logp[:, 1], pos_labels_B=lab.pos_B, neg_labels_B=lab.neg_B,
                uncond_B=lab.uncond_B, loss_type=cfg.loss.type, beta=cfg.loss.beta,
                lambda_=cfg.loss.lambda_, uncond_ratio=cfg.loss.uncond_ratio,
                uncond_zero_form=cfg.loss.uncond_zero_form, num_tokens=tokens.shape[1])
            return out.loss, out.metrics

        (loss, metrics), ct = jax.value_and_grad(loss_of, has_aux=True)(pol_logp)
        _, grads = logp_and_pullback(params, labels2, ct, aux)
        _check_variant(fx, name, family, loss, metrics, pol_logp, ref_logp, grads)


def _check_variant(fx, name, family, loss, metrics, policy_logp, ref_logp, grads):
    g = fx.group(f"{name}/")
    # per-sample log-likelihoods: sums over L tokens (README: atol 2e-3)
    pl, rl = np.asarray(policy_logp), np.asarray(ref_logp)
    for ours, key in ((pl[:, 0], "img_logps"), (pl[:, 1], "negative_img_logps"),
                      (rl[:, 0], "img_ref_logps"), (rl[:, 1], "negative_img_ref_logps")):
        np.testing.assert_allclose(ours, g[key], rtol=0, atol=2e-3, err_msg=f"{name} {key}")
    np.testing.assert_allclose(loss, g["loss"], rtol=1e-4, err_msg=name)
    for off, val in g.items():
        key = METRIC_NAMES.get(off[7:]) if off.startswith("metric/") else None
        if key in metrics:
            np.testing.assert_allclose(metrics[key], val, rtol=1e-4, atol=2e-4,
                                       err_msg=f"{name} {off}")
    sd = family.to_state_dict(grads)
    for key, want in fx.group(f"{name}/grad/").items():
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(sd[key], want, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"{name} grad {key}")
    norms = fx.group(f"{name}/grad_norm/")
    assert set(norms) == set(sd), sorted(set(norms) ^ set(sd))
    for key, want in norms.items():
        np.testing.assert_allclose(np.linalg.norm(sd[key]), want, rtol=1e-4,
                                   atol=1e-6 * g["grad_global_l2"], err_msg=f"{name} {key}")
    np.testing.assert_allclose(optim.global_norm(grads), g["grad_global_l2"], rtol=1e-4,
                               err_msg=name)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("cca_step_llamagen", "cca_step_var"))
def test_sharded_train_step_matches_official(fx):
    """The jitted Trainer step (2-device FSDP mesh, fixed TBM mask) reports the official loss,
    metrics and pre-clip gradient norm for the first variant with uncond_ratio > 0."""
    name, variant = next((n, v) for n, v in fx.meta["variants"].items() if v["uncond_ratio"] > 0)
    cfg = fixture_config(fx, variant)
    n = 2 if cfg.train.global_batch_size % 2 == 0 else 1  # shard the batch when it splits
    cfg.mesh.fsdp = n
    tr = train.Trainer(cfg, total_steps=1, devices=jax.devices()[:n])
    params, ref, aux, tokens, labels, tbm = fixture_inputs(fx, tr.family)
    state, _ = tr.init_state(params)
    batch = tr.global_batch({"tokens": np.asarray(tokens, np.int32),
                             "labels": np.asarray(labels, np.int32), "uncond_mask": tbm})
    _, m = tr.step(state, tr.reference_params(ref), batch, tr.aux_global(aux))
    g = fx.group(f"{name}/")
    np.testing.assert_allclose(m["loss"], g["loss"], rtol=1e-4)
    np.testing.assert_allclose(m["grad_norm"], g["grad_global_l2"], rtol=1e-4)
    for off, val in g.items():
        if off.startswith("metric/") and off[7:] in METRIC_NAMES:
            np.testing.assert_allclose(m[METRIC_NAMES[off[7:]]], val, rtol=1e-4, atol=2e-4,
                                       err_msg=off)


# ============================================================================ the loop, on CPU

def tiny_config(num_steps=3, **mesh):
    """A 1-layer LlamaGen with every dropout on, 2 micro-batches, uncond masking, synthetic data."""
    c = base_config()
    c.model.family = "llamagen"
    c.model.update(dict(dim=32, n_layer=1, n_head=8, vocab_size=64, num_classes=10, block_size=16,
                        multiple_of=32, class_dropout_prob=0.1, token_dropout_p=0.1,
                        resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.0))
    c.loss.update(dict(type="cca", beta=0.5, lambda_=4.0, uncond_ratio=0.25))
    c.optim.update(dict(lr=1e-4, schedule="var_lin0", warmup_steps=1.0, schedule_steps=6.0,
                        end_ratio=0.1, grad_accum_steps=2, accum="sum", grad_clip=1.0))
    c.train.update(dict(global_batch_size=16, num_steps=num_steps, log_every=1, ckpt_every=3))
    c.data.source = "synthetic"
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.mesh.update(mesh)
    return c


def _max_rel(tree_a, tree_b):
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


def perturbed_init(family, seed=0, sigma=0.02):
    """Official init + noise (like the fixtures), so that no tensor (e.g. the zero head) is 0."""
    params = jax.device_get(family.init_params(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: (x + sigma * rng.standard_normal(x.shape)).astype(np.float32), params)


def run_steps(config, devices, n, trainer=None):
    """n steps of the bare Trainer (no checkpoints, no logging): (per-step metrics, final params
    as numpy). Works in a multi-process run too (each process feeds only its rows)."""
    from jax.experimental import multihost_utils
    tr = trainer or train.Trainer(config, total_steps=6, devices=devices)
    data = train.make_data(config, tr.family, tr.mesh)
    state, ref = tr.init_state(perturbed_init(tr.family), seed=config.seed, with_reference=True)
    out = []
    for _ in range(n):
        state, m = tr.step(state, ref, tr.global_batch(next(data)), None)
        out.append({k: float(train._host(v)) for k, v in m.items()})
    return out, multihost_utils.process_allgather(state.params, tiled=True)


@pytest.fixture(scope="module")
def tiny_trainers():
    """Compiled steps shared by the mesh and restart tests: 1 device and FSDP over 8."""
    devs = jax.devices()
    assert len(devs) >= 8
    return {"one": train.Trainer(tiny_config(6), total_steps=6, devices=devs[:1]),
            "fsdp8": train.Trainer(tiny_config(6, fsdp=8), total_steps=6, devices=devs[:8])}


@pytest.fixture(scope="module")
def one_device_run(tiny_trainers):
    return run_steps(tiny_config(), None, 3, trainer=tiny_trainers["one"])


@pytest.mark.parametrize("mesh", [{"data": 8}, {"fsdp": 8}, {"tensor": 8}],
                         ids=["data8", "fsdp8", "tensor8"])
def test_same_result_on_1_and_8_devices(mesh, tiny_trainers, one_device_run):
    ref_m, ref_params = one_device_run
    assert len({m["loss"] for m in ref_m}) == 3  # the runs really train
    assert all(m["finite"] == 1.0 for m in ref_m)
    tr = tiny_trainers["fsdp8"] if mesh == {"fsdp": 8} else None
    ms, params = run_steps(tiny_config(**mesh), jax.devices()[:8], 3, trainer=tr)
    for key in ("loss", "grad_norm", "acc", "uncond_count", "sft_loss"):
        np.testing.assert_allclose([m[key] for m in ms], [m[key] for m in ref_m], rtol=1e-5,
                                   err_msg=f"{mesh} {key}")
    # a difference of two ~1e2 float32 sums: compare absolutely
    np.testing.assert_allclose([m["reward_margin"] for m in ms],
                               [m["reward_margin"] for m in ref_m], rtol=0, atol=1e-4)
    assert _max_rel(params, ref_params) <= 1e-5, mesh


def test_restart_equals_straight_run_also_on_another_device_count(tmp_path, tiny_trainers):
    import shutil
    from cca_jax import checkpoint
    init_dir = str(tmp_path / "init")  # the "pretrained" model: an Orbax params dir
    checkpoint.export_params(perturbed_init(families.from_config(tiny_config())), init_dir)

    def cfg(num_steps, **mesh):
        c = tiny_config(num_steps=num_steps, **mesh)
        c.init.reference_checkpoint = init_dir
        return c

    eight, one = tiny_trainers["fsdp8"], tiny_trainers["one"]
    straight = train.train_and_evaluate(cfg(6, fsdp=8), str(tmp_path / "a"), trainer=eight)
    assert straight["step"] == 6 and len(straight["history"]) == 6
    p_straight = jax.device_get(straight["state"].params)
    # 3 steps on 1 device, then resume on 8 (the checkpoint is restored onto another mesh)
    first = train.train_and_evaluate(cfg(3), str(tmp_path / "b"), trainer=one)
    assert first["step"] == 3
    second = train.train_and_evaluate(cfg(6, fsdp=8), str(tmp_path / "b"), trainer=eight)
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    assert _max_rel(jax.device_get(second["state"].params), p_straight) <= 1e-6
    np.testing.assert_allclose([h["loss"] for h in second["history"]],
                               [h["loss"] for h in straight["history"][3:]], rtol=1e-6)
    # same mesh: resume from the straight run's own step-3 checkpoint -> identical bits
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "6")
    third = train.train_and_evaluate(cfg(6, fsdp=8), str(tmp_path / "c"), trainer=eight)
    assert [h["step"] for h in third["history"]] == [4, 5, 6]
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(third["state"].params)),
                    jax.tree_util.tree_leaves(p_straight)):
        np.testing.assert_array_equal(a, b)


# ======================================================= accumulation, non-finite, bad inputs

def _det_config(accum_mode):
    """No dropout, no masking: the step is a deterministic function of the batch."""
    c = tiny_config(num_steps=2, fsdp=2)
    c.model.update(dict(class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0,
                        ffn_dropout_p=0.0))
    c.loss.uncond_ratio = 0.0
    c.optim.update(dict(accum=accum_mode, schedule="constant", grad_clip=0.05))
    c.train.global_batch_size = 8
    return c


@pytest.fixture(scope="module")
def sum_trainer():
    c = _det_config("sum")
    tr = train.Trainer(c, total_steps=2, devices=jax.devices()[:2])
    return c, tr


def test_grad_accumulation_sum_and_mean(sum_trainer):
    c, tr = sum_trainer
    params = perturbed_init(tr.family)
    batch = next(train.SyntheticData(global_batch=8, num_tokens=16, vocab_size=64, num_classes=10,
                                     seed=0, rows=slice(0, 8), size=64))
    micro = jax.jit(lambda p, t, y: train.micro_loss_and_grads(
        p, p, t, y, jax.random.key(0), None, family=tr.family, opts=tr.opts))
    outs = [micro(params, batch["tokens"][j::2], batch["labels"][j::2]) for j in range(2)]
    g_sum = jax.tree_util.tree_map(lambda a, b: a + b, outs[0][2], outs[1][2])
    mean_loss = (float(outs[0][0]) + float(outs[1][0])) / 2

    state, ref = tr.init_state(params, with_reference=True)
    state, m = tr.step(state, ref, tr.global_batch(batch), None)
    np.testing.assert_allclose(m["loss"], mean_loss, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], optim.global_norm(g_sum), rtol=1e-5)
    # the update is AdamW(clip(sum of micro-step gradients)) — LlamaGen's semantics
    upd, _ = tr.tx.update(g_sum, tr.tx.init(params), params)
    want = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)
    assert _max_rel(jax.device_get(state.params), want) <= 1e-5

    c_mean = _det_config("mean")
    tr_mean = train.Trainer(c_mean, total_steps=2, devices=jax.devices()[:2])
    s2, r2 = tr_mean.init_state(params, with_reference=True)
    _, m2 = tr_mean.step(s2, r2, tr_mean.global_batch(batch), None)
    np.testing.assert_allclose(m2["grad_norm"], optim.global_norm(g_sum) / 2, rtol=1e-5)

    # "sum" keeps the official scale (sum_steps x the mean gradient) when the accumulation steps
    # change: one micro-step of all 8 rows with sum_steps=2 applies 2x its gradient
    c_one = _det_config("sum")
    c_one.optim.update(dict(grad_accum_steps=1, sum_steps=2))
    tr_one = train.Trainer(c_one, total_steps=2, devices=jax.devices()[:2])
    _, _, g_all, _ = jax.jit(lambda p, t, y: train.micro_loss_and_grads(
        p, p, t, y, jax.random.key(0), None, family=tr_one.family, opts=tr_one.opts))(
        params, batch["tokens"], batch["labels"])
    s3, r3 = tr_one.init_state(params, with_reference=True)
    s3, m3 = tr_one.step(s3, r3, tr_one.global_batch(batch), None)
    np.testing.assert_allclose(m3["grad_norm"], 2 * optim.global_norm(g_all), rtol=1e-5)


def test_nonfinite_step_is_not_applied(sum_trainer):
    c, tr = sum_trainer
    params = perturbed_init(tr.family)
    bad_ref = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), params)
    state, _ = tr.init_state(params)
    state, m = tr.step(state, tr.reference_params(bad_ref), tr.global_batch(
        {"tokens": np.zeros((8, 16), np.int32), "labels": np.arange(8, dtype=np.int32)}), None)
    assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                    jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Adam's moments and count stay; the LR/WD schedules move on with the step (applied = logged)
    is_sched = lambda x: isinstance(x, optim.ScheduleState)  # noqa: E731
    sched = [x for x in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_sched) if is_sched(x)]
    assert sched and all(int(x.count) == 1 for x in sched)
    adam = [x for x in jax.tree_util.tree_leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)]
    assert len(adam) == 1 and int(adam[0].count) == 0
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree_util.tree_leaves(adam[0].mu))


def test_nonfinite_loss_stops_naming_the_step(sum_trainer, tmp_path):
    from cca_jax import checkpoint
    c, tr = sum_trainer
    nan_dir = str(tmp_path / "nan")
    checkpoint.export_params(jax.tree_util.tree_map(
        lambda x: np.full_like(x, np.nan), perturbed_init(tr.family)), nan_dir)
    c = _det_config("sum")
    c.init.reference_checkpoint = nan_dir
    with pytest.raises(FloatingPointError, match="step 1"):
        train.train_and_evaluate(c, str(tmp_path / "w"), trainer=tr)
    assert not (tmp_path / "w" / "checkpoints" / "1").exists()


def test_missing_inputs_name_the_config_field(tmp_path):
    one = jax.devices()[:1]
    c = tiny_config()
    c.data.source = "shards"
    with pytest.raises(ValueError, match="config.data.path"):
        train.train_and_evaluate(c, str(tmp_path / "a"), devices=one)
    c = tiny_config()
    c.init.reference_checkpoint = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="config.init.reference_checkpoint"):
        train.train_and_evaluate(c, str(tmp_path / "b"), devices=one)
    assert not (tmp_path / "b").exists()  # nothing written before the inputs are checked
    c = tiny_config()
    c.data.source, c.data.path = "shards", str(tmp_path)  # data given, no pretrained model
    with pytest.raises((ValueError, FileNotFoundError)):
        train.initial_params(c, families.from_config(c))
    c = tiny_config(fsdp=8)
    c.train.global_batch_size = 24  # not a multiple of accum (2) x 8 batch shards
    with pytest.raises(ValueError, match="global_batch_size"):
        train.Trainer(c, total_steps=1, devices=jax.devices()[:8])
    c = tiny_config()
    c.loss.type = "ppo"
    with pytest.raises(ValueError, match="config.loss.type"):
        train.StepOptions.from_config(c)
    c = tiny_config()  # no null row in the class table, but TBM would feed the null class
    c.model.class_dropout_prob, c.loss.uncond_ratio = 0.0, 0.1
    with pytest.raises(ValueError, match="no null row.*class_dropout_prob"):
        train.Trainer(c, total_steps=1, devices=one)
    c.loss.type, c.loss.label_dropout = "mle", 0.1
    with pytest.raises(ValueError, match="config.loss.label_dropout"):
        train.Trainer(c, total_steps=1, devices=one)


def test_sigterm_checkpoints_and_stops_then_resumes(sum_trainer, tmp_path, monkeypatch):
    import os
    import signal
    c, tr = sum_trainer
    real_make_data = train.make_data

    class Interrupting:
        """Delivers SIGTERM to this process while the first batch is being read."""

        def __init__(self, inner):
            self.inner, self.sent = inner, False

        def __next__(self):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.inner)

        def state(self):
            return self.inner.state()

        def restore(self, s):
            self.inner.restore(s)

    monkeypatch.setattr(train, "make_data", lambda *a: Interrupting(real_make_data(*a)))
    # an in-training eval due at the stopping step is skipped: the grace period is for the save
    monkeypatch.setattr(train, "make_eval_hook", lambda *a: (
        lambda params, step: pytest.fail("eval ran after the preemption notice")))
    c_eval = _det_config("sum")
    c_eval.train.eval_every = 1
    out = train.train_and_evaluate(c_eval, str(tmp_path), trainer=tr)
    assert out["step"] == 1 and out["evals"] == []  # stopped after the step the notice came in
    assert (tmp_path / "checkpoints" / "1").exists()
    monkeypatch.setattr(train, "make_data", real_make_data)
    out = train.train_and_evaluate(_det_config("sum"), str(tmp_path), trainer=tr)
    assert out["step"] == 2 and [h["step"] for h in out["history"]] == [2]


def test_bf16_compute_and_mle_loss(sum_trainer):
    import dataclasses
    c, tr = sum_trainer
    fam = tr.family
    params = jax.tree_util.tree_map(jnp.asarray, perturbed_init(fam))
    batch = next(train.SyntheticData(global_batch=8, num_tokens=16, vocab_size=64, num_classes=10,
                                     seed=1, rows=slice(0, 8), size=64))
    t, y = jnp.asarray(batch["tokens"]), jnp.asarray(batch["labels"])

    def run(opts, ref):
        return jax.jit(lambda p, r: train.micro_loss_and_grads(
            p, r, t, y, jax.random.key(0), None, family=fam, opts=opts))(params, ref)

    # bf16 matmuls with fp32 master weights and a bf16 reference: close to fp32, fp32 grads
    bf16 = dataclasses.replace(tr.opts, compute_dtype=jnp.bfloat16)
    ref16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    l32, m32, g32, _ = run(tr.opts, params)
    l16, m16, g16, _ = run(bf16, ref16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g16))
    np.testing.assert_allclose(m16["sft_loss"], m32["sft_loss"], rtol=2e-2)
    assert np.isfinite(float(l16))
    # maximum likelihood (no reference): the token-mean cross-entropy
    mle = dataclasses.replace(tr.opts, loss_type="mle", label_dropout=0.0)
    loss, m, g, _ = run(mle, None)
    logits = fam.logits(params, t, y, train=True, rng=None)
    want = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert optim.global_norm(g) > 0


def test_periodic_eval_hook_is_called(sum_trainer, tmp_path, monkeypatch):
    c, tr = sum_trainer
    calls = []

    def fake_hook(config, workdir, trainer):
        assert trainer is tr
        return lambda params, step: calls.append(step) or {"eval/fid": 1.0 / step}

    monkeypatch.setattr(train, "make_eval_hook", fake_hook)
    cfg = _det_config("sum")
    cfg.train.eval_every = 1
    out = train.train_and_evaluate(cfg, str(tmp_path), trainer=tr)
    assert out["step"] == 2 and calls == [1, 2]


def test_in_training_fid_samples_the_policy_from_scratch(tmp_path, monkeypatch):
    """train.eval_every through the real hook: the family's sampler + tokenizer decode + metrics,
    on a run with no reference and no checkpoint yet (the hook must not load model params)."""
    from cca_jax import checkpoint, evaluate
    from cca_jax.models import vq16

    c = tiny_config(num_steps=2, fsdp=-1)  # every device: the samples are sharded too
    c.model.update(dict(block_size=4, vocab_size=16))  # 2x2 code grid
    c.loss.update(dict(type="mle", label_dropout=0.1))
    c.optim.grad_accum_steps = 1
    c.init.from_scratch = True
    c.tokenizer = vq16.default_config(codebook_size=16, codebook_embed_dim=4, z_channels=8,
                                      encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], ch=8,
                                      num_res_blocks=1, norm_groups=4, codebook_show_usage=False)
    tok = vq16.init_params(vq16.VQ16Config.from_config(c.tokenizer), jax.random.key(2))
    checkpoint.export_params(tok, tmp_path / "tok")
    c.init.tokenizer_checkpoint = str(tmp_path / "tok")
    c.sample.update(dict(batch_size=1, image_size_eval=0, cfg_scale=1.0))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8))
    c.eval.update(dict(reference_npz=str(tmp_path / "ref.npz"), train_num_samples=6, batch_size=6,
                       train_metrics="fid"))
    c.train.eval_every = 1
    seen = []

    def toy_net(config):
        def features(params, x):  # [B, H, W, 3] uint8 -> 5 features per image
            seen.append(tuple(x.shape[1:]))  # traced under jit: the static shape
            x = jnp.asarray(x, jnp.float32) / 255.0
            return jnp.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[..., 0].mean((1, 2)),
                              x[:, :2].mean((1, 2, 3)), x[:, :, :2].mean((1, 2, 3))], -1)
        return evaluate.FeatureNet(features, name="toy")

    monkeypatch.setattr(evaluate, "feature_net_from_config", toy_net)
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
    fids = [e["eval/fid"] for e in out["evals"]]
    assert [e["step"] for e in out["evals"]] == [1, 2]
    assert out["step"] == 2 and len(fids) == 2 and all(np.isfinite(f) and f > 0 for f in fids)
    assert seen and set(seen) == {(4, 4, 3)}  # the decoded 4x4 RGB samples were scored


def test_var_tokenizer_must_be_the_one_that_tokenized_the_shards(tmp_path):
    import dataclasses
    import types

    from cca_jax import checkpoint
    from cca_jax.data.reader import MetadataMismatchError
    from cca_jax.models import vq16, vqvae

    tiny = vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                             patch_nums=(1, 2, 3, 4))
    params = vqvae.init_params(tiny, jax.random.key(0))
    checkpoint.export_params(params, tmp_path / "vae")
    c = base_config()
    c.model.family = "var"
    c.tokenizer.update({"family": "vqvae", **{k: v for k, v in dataclasses.asdict(tiny).items()}})
    c.init.tokenizer_checkpoint = str(tmp_path / "vae")
    c.data.path = str(tmp_path / "shards")
    data = lambda checksum: types.SimpleNamespace(store=types.SimpleNamespace(  # noqa: E731
        meta={"tokenizer": {"checksum": checksum, "config": {"checkpoint": "other_vae.pth"}}}))
    train.check_tokenizer_matches_data(c, data(vq16.params_checksum(params)))  # the same VQVAE
    with pytest.raises(MetadataMismatchError, match="tokenizer_checkpoint=.*other_vae.pth"):
        train.check_tokenizer_matches_data(c, data("0" * 64))
    c.data.tokenizer_checksum = "0" * 64  # an explicit checksum is the reader's business
    train.check_tokenizer_matches_data(c, data("0" * 64))


def test_resume_names_changed_settings():
    c = tiny_config()
    saved = c.to_dict()
    assert train.resume_config_changes(saved, c) == []
    assert train.resume_config_changes({}, c) == []
    c.loss.lambda_, c.optim.lr, c.train.log_every = 8.0, 3e-4, 7  # train.* is not checked
    assert train.resume_config_changes(saved, c) == ["loss.lambda_: 4.0 -> 8.0",
                                                     "optim.lr: 0.0001 -> 0.0003"]


def test_bf16_step_keeps_the_float32_kernels_of_var_in_float32():
    """The step casts kernels to the compute dtype before the forward, except those the model
    multiplies in float32 (VAR's word_embed and head_nm): the logits are the model's own."""
    import dataclasses
    from test_families import var_config
    c = var_config()
    c.model.drop_path_rate = 0.0
    fam = families.from_config(c)
    opts = dataclasses.replace(train.StepOptions.from_config(c), compute_dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(jnp.asarray, perturbed_init(fam))
    aux = fam.make_aux(c, jax.random.key(2))
    t = jax.random.randint(jax.random.key(3), (4, fam.num_tokens), 0, c.model.vocab_size)
    y = jnp.arange(4, dtype=jnp.int32)
    _, _, _, ex = jax.jit(lambda p: train.micro_loss_and_grads(
        p, p, t, y, jax.random.key(0), aux, family=fam, opts=opts))(params)
    labels2 = train._interleave(ex["pos_labels"], ex["neg_labels"])
    t2 = train._interleave(t, t)
    logits = jax.jit(lambda p: fam.logits(p, t2, labels2, train=True, rng=jax.random.key(1),
                                          dtype=jnp.bfloat16, aux=aux))(params)
    want = losses.sequence_logp(logits, t2).reshape(4, 2)
    np.testing.assert_array_equal(ex["ref_logp"], want)
