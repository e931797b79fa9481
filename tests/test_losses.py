"""cca_jax.losses: unit tests and parity with the official per-sample CCA quantities."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fixture_harness
from cca_jax import losses

# official metric name -> ours (LlamaGen logs *_rew, VAR *_reward and "sftloss" spellings)
METRIC_NAMES = {
    "acc": "acc", "reward_margin": "reward_margin",
    "chosen_rew": "chosen_reward", "rejected_rew": "rejected_reward",
    "chosen_reward": "chosen_reward", "rejected_reward": "rejected_reward",
    "uncond_reward": "uncond_reward",
    "sftloss": "sft_loss", "shuffle_sftloss": "shuffle_sft_loss",
    "ref_sftloss": "ref_sft_loss", "ref_shuffle_sftloss": "ref_shuffle_sft_loss",
    "Lm": "sft_loss",  # Lm is the token-mean CE of the positive logits = sftloss with ls=0
}


def fixture_batch(fx):
    """(labels [B], TBM [B], tokens [B, L], null label, uncond_ratio==0 form) of a cca_step fixture."""
    a = fx.arrays
    if fx.kind == "cca_step_llamagen":
        return (a["batch/c_indices"], a["batch/TBM"], a["batch/z_indices"],
                fx.meta["model_args"]["num_classes"], "llamagen")
    return (a["batch/label_B"], a["batch/TBM"], a["batch/gt_BL"],
            fx.meta["var_args"]["num_classes"], "var")


def variant_labels(fx, name):
    key = "all_c_indices" if fx.kind == "cca_step_llamagen" else "all_label_B"
    return fx.arrays[f"{name}/{key}"]


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("cca_step_llamagen", "cca_step_var"))
def test_cca_loss_matches_official(fx):
    labels, tbm, tokens, null_label, zero_form = fixture_batch(fx)
    B, L = tokens.shape
    for name, v in fx.meta["variants"].items():
        g = fx.group(f"{name}/")
        uncond = v["uncond_ratio"]
        # the official code rolls within its per-device micro-batch: here the whole fixture batch
        lab = losses.build_cca_labels(jnp.asarray(labels), null_label=null_label,
                                      mask_B=jnp.asarray(tbm if uncond > 0 else np.zeros_like(tbm)),
                                      negatives="group_roll", roll_group=B)
        np.testing.assert_array_equal(np.concatenate([lab.pos_B, lab.neg_B]),
                                      variant_labels(fx, name), err_msg=name)
        out = losses.cca_loss(
            policy_pos_B=jnp.asarray(g["img_logps"]), policy_neg_B=jnp.asarray(g["negative_img_logps"]),
            ref_pos_B=jnp.asarray(g["img_ref_logps"]), ref_neg_B=jnp.asarray(g["negative_img_ref_logps"]),
            pos_labels_B=lab.pos_B, neg_labels_B=lab.neg_B, uncond_B=lab.uncond_B,
            loss_type=v["loss_type"].lower(), beta=v["beta"], lambda_=v["lambda_"],
            uncond_ratio=uncond, uncond_zero_form=zero_form, num_tokens=L)
        np.testing.assert_allclose(out.loss, g["loss"], rtol=1e-5, atol=0, err_msg=name)
        if "neg_weight" in g:
            np.testing.assert_array_equal(out.neg_weight_B, g["neg_weight"], err_msg=name)
            np.testing.assert_allclose(out.mixed_weight_B, g["mixed_weight"], rtol=0, err_msg=name)
        metrics = {k[len("metric/"):]: x for k, x in g.items() if k.startswith("metric/")}
        checked = 0
        for off, val in metrics.items():
            if off not in METRIC_NAMES:
                continue  # Lt / Accm / Acct need logits: checked by the full-step parity test
            np.testing.assert_allclose(out.metrics[METRIC_NAMES[off]], val, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} {off}")
            checked += 1
        assert checked >= 4, (name, sorted(metrics))


def test_sequence_logp_is_sum_of_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(3, 5))
    ls = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(ls, targets[..., None], -1)[..., 0].sum(-1)
    got = losses.sequence_logp(jnp.asarray(logits), targets)
    assert got.dtype == jnp.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_token_metrics_last_tokens():
    logits = np.zeros((1, 4, 3), np.float32)
    logits[0, :, 0] = 5.0  # predicts token 0 everywhere
    targets = np.array([[0, 1, 0, 0]])
    m = losses.token_metrics(jnp.asarray(logits), targets, last_l=2)
    assert float(m["Accm"]) == pytest.approx(75.0)
    assert float(m["Acct"]) == pytest.approx(100.0)
    assert float(m["Lt"]) < float(m["Lm"])


def test_rolls():
    y = jnp.arange(6)
    np.testing.assert_array_equal(losses.roll_negatives(y), [1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(losses.roll_negatives(y, negatives="group_roll", roll_group=2),
                                  [1, 0, 3, 2, 5, 4])
    np.testing.assert_array_equal(losses.roll_negatives(y, negatives="group_roll", roll_group=3),
                                  [1, 2, 0, 4, 5, 3])
    with pytest.raises(ValueError, match="roll_group"):
        losses.roll_negatives(y, negatives="group_roll", roll_group=4)
    with pytest.raises(ValueError, match="negatives"):
        losses.roll_negatives(y, negatives="shuffle")


def test_build_labels_masks_after_roll():
    y = jnp.array([3, 4, 5, 6])
    mask = jnp.array([False, True, False, False])
    lab = losses.build_cca_labels(y, null_label=10, mask_B=mask)
    np.testing.assert_array_equal(lab.pos_B, [3, 10, 5, 6])
    # row 0 keeps its neighbour's ORIGINAL label (4) although that neighbour was masked
    np.testing.assert_array_equal(lab.neg_B, [4, 10, 6, 3])


def test_uncond_mask_is_seeded_and_has_the_rate():
    k = jax.random.key(3)
    m1 = losses.uncond_mask(k, 20000, 0.1)
    m2 = losses.uncond_mask(k, 20000, 0.1)
    np.testing.assert_array_equal(m1, m2)
    assert 0.09 < float(m1.mean()) < 0.11
    assert not losses.uncond_mask(k, 8, 0.0).any()
    lab = losses.build_cca_labels(jnp.arange(20000) % 7, null_label=7, rng=k, uncond_ratio=0.1)
    np.testing.assert_array_equal(lab.uncond_B, m1)


def test_cca_gradient_signs():
    """TBM rows push both conditions up; ordinary rows push the negative down with weight λ."""
    def loss_fn(pol_pos, pol_neg, form="llamagen", ratio=0.1):
        return losses.cca_loss(policy_pos_B=pol_pos, policy_neg_B=pol_neg, ref_pos_B=jnp.zeros(2),
                               ref_neg_B=jnp.zeros(2), pos_labels_B=jnp.array([1, 9]),
                               neg_labels_B=jnp.array([2, 9]), uncond_B=jnp.array([False, True]),
                               beta=0.02, lambda_=50.0, uncond_ratio=ratio,
                               uncond_zero_form=form).loss
    gp, gn = jax.grad(loss_fn, argnums=(0, 1))(jnp.zeros(2), jnp.zeros(2))
    assert (gp < 0).all()  # positives: likelihood up
    assert gn[0] > 0 and gn[1] < 0  # negative down; TBM row's negative up
    np.testing.assert_allclose(gn[0] / -gn[1], 50.0, rtol=1e-6)
    # uncond_ratio == 0: the two official forms
    lin = loss_fn(jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0]), "llamagen", 0.0)
    np.testing.assert_allclose(lin, -1.5 + 50.0 * 4.0, rtol=1e-6)
    sig = loss_fn(jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0]), "var", 0.0)
    ls = jax.nn.log_sigmoid
    want = -jnp.mean(ls(0.02 * jnp.array([1.0, 2.0]))) - 50.0 * jnp.mean(ls(-0.02 * jnp.array([3.0, 5.0])))
    np.testing.assert_allclose(sig, want, rtol=1e-6)


def test_uncond_reward_nan_without_tbm_rows():
    out = losses.cca_loss(policy_pos_B=jnp.ones(2), policy_neg_B=jnp.ones(2), ref_pos_B=jnp.zeros(2),
                          ref_neg_B=jnp.zeros(2), pos_labels_B=jnp.array([1, 2]),
                          neg_labels_B=jnp.array([2, 1]), uncond_B=jnp.zeros(2, bool))
    assert np.isnan(out.metrics["uncond_reward"]) and float(out.metrics["uncond_count"]) == 0


def test_mle_and_label_dropout():
    out = losses.mle_loss(logp_B=jnp.array([-10.0, -30.0]), num_tokens=10)
    np.testing.assert_allclose(out.loss, 2.0)
    y = jnp.arange(10000) % 5
    d = losses.drop_labels(jax.random.key(0), y, rate=0.25, null_label=5)
    frac = float((d == 5).mean())
    assert 0.23 < frac < 0.27
    np.testing.assert_array_equal(np.where(d != 5, d, y), y)
    np.testing.assert_array_equal(losses.drop_labels(jax.random.key(0), y, rate=0.0, null_label=5), y)


def test_bad_options_name_the_field():
    kw = dict(policy_pos_B=jnp.zeros(2), policy_neg_B=jnp.zeros(2), ref_pos_B=jnp.zeros(2),
              ref_neg_B=jnp.zeros(2), pos_labels_B=jnp.zeros(2, int), neg_labels_B=jnp.zeros(2, int),
              uncond_B=jnp.zeros(2, bool))
    with pytest.raises(ValueError, match="loss_type"):
        losses.cca_loss(loss_type="ipo", **kw)
    with pytest.raises(ValueError, match="uncond_zero_form"):
        losses.cca_loss(uncond_zero_form="x", uncond_ratio=0.0, **kw)


def test_token_logp_custom_gradient_matches_autodiff():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)).astype(np.float32) * 4)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    w = jnp.asarray(rng.normal(size=(2, 5)).astype(np.float32))

    def naive(x):
        return jnp.sum(w * jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0])

    ours = lambda x: jnp.sum(w * losses.token_logp(x, targets))  # noqa: E731
    np.testing.assert_allclose(ours(logits), naive(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(naive)(logits), rtol=1e-5, atol=1e-6)
    _, top1 = losses.token_logp_and_top1(logits, targets)
    np.testing.assert_array_equal(top1, jnp.argmax(logits, -1) == targets)
