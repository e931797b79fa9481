"""cca_jax.optim against torch.optim.AdamW + clip_grad_norm_ and VAR's schedule formulas."""

import math

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from cca_jax import optim
from configs.common import base_config


def _cfg(**kw):
    c = base_config().optim
    c.update(kw)
    return c


def test_adamw_clip_matches_torch():
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "norm": (3,), "emb": (5, 2, 2)}
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (rng.normal(size=s) * (3.0 if i == 1 else 0.1)).astype(np.float32)
              for k, s in shapes.items()} for i in range(3)]
    cfg = _cfg(lr=1e-2, weight_decay=0.05, grad_clip=1.0)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    decay = [tp[k] for k in tp if tp[k].dim() >= 2]
    nodecay = [tp[k] for k in tp if tp[k].dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": nodecay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()

    params = {k: jnp.asarray(v) for k, v in p0.items()}
    tx, _ = optim.make_optimizer(cfg, decay_mask=optim.ndim_decay_mask(params), total_steps=3)
    state = tx.init(params)
    for g in grads:
        upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, upd)
    for k in p0:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def _lr_wd_official(g, *, wp_it, max_it, wp0, wpe, lr, wd, wd_end):
    """VAR lr_wd_annealing('lin0') written from the spec (cca.md §6.5)."""
    wp_it = round(wp_it)
    if g < wp_it:
        r = wp0 + (1 - wp0) * g / wp_it
    else:
        p = (g - wp_it) / (max_it - 1 - wp_it)
        r = 1.0 if p < 0.05 else wpe + (1 - wpe) * (1 - p) / 0.95
    cur_wd = wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * g / (max_it - 1)))
    return r * lr, cur_wd


@pytest.mark.parametrize("accum,warm,sched_steps", [(4, 100.0, 5004.75), (8, 100.125, 5004.625), (1, 3.0, 40)])
def test_var_lin0_schedule(accum, warm, sched_steps):
    cfg = _cfg(lr=2e-5, schedule="var_lin0", warmup_steps=warm, warmup_start=0.005, end_ratio=0.01,
               weight_decay=0.05, weight_decay_end=0.08, grad_accum_steps=accum,
               schedule_steps=sched_steps)
    s = optim.make_schedules(cfg, total_steps=123)
    max_it = sched_steps * accum
    steps = [0, 1, 5, int(warm) - 1, int(warm), int(warm) + 1, int(sched_steps * 0.5),
             int(sched_steps) - 1]
    for k in steps:
        g = (k + 1) * accum - 1
        want_lr, want_wd = _lr_wd_official(g, wp_it=warm * accum, max_it=max_it, wp0=0.005,
                                           wpe=0.01, lr=2e-5, wd=0.05, wd_end=0.08)
        np.testing.assert_allclose(float(s.lr(k)), want_lr, rtol=2e-6, err_msg=str(k))
        np.testing.assert_allclose(float(s.wd(k)), want_wd, rtol=2e-6, err_msg=str(k))


def test_constant_schedule_and_bad_names():
    s = optim.make_schedules(_cfg(lr=3e-4), total_steps=10)
    assert float(s.lr(7)) == pytest.approx(3e-4) and float(s.wd(7)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedules(_cfg(schedule="cosine"), total_steps=10)
    with pytest.raises(ValueError, match="optim.accum"):
        optim.make_optimizer(_cfg(accum="avg"), decay_mask={}, total_steps=1)


def test_var_decay_rule_on_official_names():
    d = {"word_embed.weight": 2, "class_emb.weight": 2, "blocks.0.attn.mat_qkv.weight": 2,
         "blocks.0.ffn.fc1.weight": 2, "blocks.0.ada_lin.1.weight": 2, "head.weight": 2,
         "head_nm.ada_lin.1.weight": 2}
    nd = {"pos_start": 3, "pos_1LC": 3, "lvl_embed.weight": 2, "blocks.0.attn.scale_mul_1H11": 4,
          "blocks.0.attn.q_bias": 1, "blocks.0.attn.v_bias": 1, "head.bias": 1,
          "blocks.0.ffn.fc1.bias": 1, "word_embed.bias": 1}
    assert all(optim.var_decay(k, n) for k, n in d.items())
    assert not any(optim.var_decay(k, n) for k, n in nd.items())


def test_accumulation_scale():
    assert optim.accumulation_scale(_cfg(accum="sum", grad_accum_steps=16)) == 1.0
    assert optim.accumulation_scale(_cfg(accum="mean", grad_accum_steps=4)) == 0.25
    # the official 16x-the-mean gradient whatever the accumulation steps of this topology
    for A in (1, 2, 16):
        assert optim.accumulation_scale(_cfg(accum="sum", grad_accum_steps=A, sum_steps=16)) == 16 / A
    with pytest.raises(ValueError, match="sum_steps"):
        optim.accumulation_scale(_cfg(accum="sum", grad_accum_steps=2, sum_steps=-1))
