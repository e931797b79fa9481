"""Dynamic loss scaling (float16 compute): torch GradScaler's rules, VAR's cap, the train step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cca_jax import checkpoint, loss_scale, train
from test_train import perturbed_init, tiny_config


def _run(opts, finite_seq, scale=None):
    st = loss_scale.init(opts) if scale is None else loss_scale.LossScaleState(
        scale=jnp.float32(scale), good_steps=jnp.int32(0))
    out = []
    for f in finite_seq:
        st = loss_scale.update(st, jnp.bool_(f), opts)
        out.append((float(st.scale), int(st.good_steps)))
    return out


def test_growth_after_interval_and_backoff_on_overflow():
    opts = loss_scale.LossScaleOptions(init=8.0, growth_interval=3)
    assert _run(opts, [True, True, True, True]) == [(8, 1), (8, 2), (16, 0), (16, 1)]
    # an overflow halves the scale and restarts the count
    assert _run(opts, [True, True, False, True, True, True]) == [
        (8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0)]


def test_cap_resets_a_scale_above_it_and_keeps_the_count():
    opts = loss_scale.LossScaleOptions(init=2.0 ** 15, growth_interval=2, cap=2.0 ** 15)
    # at the cap the normal rule runs (grows to 2^16); the step run at 2^16 is pulled back to 2^15
    # whether or not it overflowed, without touching the count of finite steps
    assert _run(opts, [True, True, True]) == [(2 ** 15, 1), (2 ** 16, 0), (2 ** 15, 0)]
    assert _run(opts, [False], scale=2.0 ** 17) == [(2 ** 15, 0)]
    no_cap = dataclasses.replace(opts, cap=0.0)
    assert _run(no_cap, [True, True, True]) == [(2 ** 15, 1), (2 ** 16, 0), (2 ** 16, 1)]


def _train_cfg(**kw):
    c = ml_collections.ConfigDict({"compute_dtype": "float32", "loss_scale": "auto",
                                   "loss_scale_init": 2048.0, "loss_scale_growth_interval": 1000,
                                   "loss_scale_cap": 0.0})
    c.update(kw)
    return c


def test_modes_from_config():
    assert loss_scale.from_config(_train_cfg()) is None
    assert loss_scale.from_config(_train_cfg(compute_dtype="bfloat16")) is None
    assert loss_scale.from_config(_train_cfg(compute_dtype="float16")).init == 2048.0
    assert loss_scale.from_config(_train_cfg(loss_scale="dynamic", loss_scale_cap=4.0)).cap == 4.0
    assert loss_scale.from_config(_train_cfg(compute_dtype="float16", loss_scale="none")) is None
    with pytest.raises(ValueError, match="config.train.loss_scale="):
        loss_scale.from_config(_train_cfg(loss_scale="static"))
    with pytest.raises(ValueError, match="loss_scale_init"):
        loss_scale.from_config(_train_cfg(loss_scale="dynamic", loss_scale_init=0.0))


@pytest.fixture(scope="module")
def fp16_trainer():
    c = tiny_config(num_steps=2)
    c.train.compute_dtype = "float16"
    tr = train.Trainer(c, total_steps=4, devices=jax.devices()[:1])
    return c, tr


def _batch(seed=0):
    return next(train.SyntheticData(global_batch=16, num_tokens=16, vocab_size=64,
                                    num_classes=10, seed=seed, rows=slice(0, 16), size=64))


def test_scaled_gradients_are_the_unscaled_ones_bit_for_bit(fp16_trainer):
    _, tr = fp16_trainer
    params = jax.tree_util.tree_map(jnp.asarray, perturbed_init(tr.family))
    b = _batch()
    f32 = dataclasses.replace(tr.opts, compute_dtype=jnp.float32)

    def grads(scale):
        return jax.jit(lambda p: train.micro_loss_and_grads(
            p, p, b["tokens"], b["labels"], jax.random.key(0), None, family=tr.family,
            opts=f32, scale=scale))(params)

    plain, scaled = grads(None), grads(jnp.float32(2.0 ** 11))
    np.testing.assert_array_equal(plain[0], scaled[0])
    for a, s in zip(jax.tree_util.tree_leaves(plain[2]), jax.tree_util.tree_leaves(scaled[2])):
        np.testing.assert_array_equal(a, s)


def test_float16_step_scales_skips_overflow_and_backs_off(fp16_trainer):
    _, tr = fp16_trainer
    params = perturbed_init(tr.family)
    state, ref = tr.init_state(params, with_reference=True)
    assert float(state.loss_scale.scale) == 2048.0
    state, m = tr.step(state, ref, tr.global_batch(_batch()), None)
    assert float(m["finite"]) == 1.0 and float(m["loss_scale"]) == 2048.0
    assert float(state.loss_scale.scale) == 2048.0 and int(state.loss_scale.good_steps) == 1
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    # a scale so large that the float16 cotangents overflow: no update, the scale halves
    before = jax.device_get(state.params)
    huge = state.replace(loss_scale=loss_scale.LossScaleState(
        scale=jnp.float32(2.0 ** 40), good_steps=jnp.int32(5)))
    state, m = tr.step(huge, ref, tr.global_batch(_batch(1)), None)
    assert float(m["finite"]) == 0.0 and np.isfinite(float(m["loss"]))
    assert float(state.loss_scale.scale) == 2.0 ** 39 and int(state.loss_scale.good_steps) == 0
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                    jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_train_loop_skips_overflows_and_resumes_the_scale(fp16_trainer, tmp_path):
    c, tr = fp16_trainer
    c = c.copy_and_resolve_references()
    c.train.loss_scale_init = 2.0 ** 40  # the first steps overflow, nonfinite="error" or not
    c.train.num_steps = 2
    out = train.train_and_evaluate(c, str(tmp_path), trainer=train.Trainer(
        c, total_steps=2, devices=jax.devices()[:1]))
    hist = out["history"]
    assert [h["loss_scale"] for h in hist] == [2.0 ** 40, 2.0 ** 39]
    assert [h["finite"] for h in hist] == [0.0, 0.0]
    c.train.num_steps = 3
    out = train.train_and_evaluate(c, str(tmp_path), trainer=train.Trainer(
        c, total_steps=3, devices=jax.devices()[:1]))
    assert [h["step"] for h in out["history"]] == [3]
    assert out["history"][0]["loss_scale"] == 2.0 ** 38  # restored from the step-2 checkpoint
    # below a scale of 1 a non-finite step is a real one again and stops the run
    nan_ref = str(tmp_path / "nan")
    checkpoint.export_params(jax.tree_util.tree_map(
        lambda x: np.full_like(x, np.nan), perturbed_init(tr.family)), nan_ref)
    c.init.reference_checkpoint = nan_ref
    c.train.update(dict(loss_scale_init=0.5, num_steps=1))
    with pytest.raises(FloatingPointError, match="step 1 .*loss scale 0.5"):
        train.train_and_evaluate(c, str(tmp_path / "w2"), trainer=train.Trainer(
            c, total_steps=1, devices=jax.devices()[:1]))


def test_var_float16_step_is_close_to_float32():
    """VAR is the recipe that trains in float16 officially (--fp16=1 with a GradScaler)."""
    from test_families import var_config
    c = var_config()
    c.model.num_classes = 10
    c.train.update(dict(global_batch_size=4, num_steps=1))
    c.loss.uncond_ratio = 0.0
    c.model.drop_path_rate = 0.0
    c.optim.grad_accum_steps = 1
    c.train.loss_scale_init = 1.0  # λ = 1000 at policy = reference: gradient norm ~1e4 already
    out = {}
    for dtype in ("float32", "float16"):
        c.train.compute_dtype = dtype
        tr = train.Trainer(c, total_steps=1, devices=jax.devices()[:1])
        data = train.make_data(c, tr.family, tr.mesh)
        state, ref = tr.init_state(perturbed_init(tr.family), with_reference=True)
        _, out[dtype] = tr.step(state, ref, tr.global_batch(next(data)),
                                tr.aux_global(tr.family.make_aux(c, jax.random.key(2))))
    assert "loss_scale" not in out["float32"] and float(out["float16"]["loss_scale"]) == 1.0
    assert float(out["float16"]["finite"]) == 1.0
    for k in ("sft_loss", "shuffle_sft_loss", "grad_norm"):
        np.testing.assert_allclose(float(out["float16"][k]), float(out["float32"][k]), rtol=2e-2)


def test_loss_scale_is_replicated_on_a_sharded_mesh():
    c = tiny_config(num_steps=1, fsdp=2)
    c.train.compute_dtype = "float16"
    tr = train.Trainer(c, total_steps=1, devices=jax.devices()[:2])
    state, ref = tr.init_state(perturbed_init(tr.family), with_reference=True)
    state, m = tr.step(state, ref, tr.global_batch(_batch()), None)
    assert float(m["loss_scale"]) == 2048.0 and float(m["finite"]) == 1.0
    for x in (state.loss_scale.scale, state.loss_scale.good_steps):
        assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 2
    assert int(state.loss_scale.good_steps) == 1


def test_a_run_resumes_in_another_precision(tmp_path):
    """float32 -> float16 starts the loss scale afresh; float16 -> bfloat16 drops it."""
    c = tiny_config(num_steps=1)
    c.train.ckpt_every = 1

    def run(dtype, steps):
        c.train.compute_dtype, c.train.num_steps = dtype, steps
        return train.train_and_evaluate(c, str(tmp_path), trainer=train.Trainer(
            c, total_steps=steps, devices=jax.devices()[:1]))

    assert "loss_scale" not in run("float32", 1)["history"][0]
    out = run("float16", 2)
    assert [h["step"] for h in out["history"]] == [2]
    assert out["history"][0]["loss_scale"] == 2048.0 and out["state"].loss_scale is not None
    out = run("bfloat16", 3)
    assert [h["step"] for h in out["history"]] == [3] and out["state"].loss_scale is None
    assert "loss_scale" not in out["history"][0]
