"""The CCA objective and its variants as pure functions (spec: ../shared/spec/cca.md §2-§4).

Everything here works on per-sample sequence log-likelihoods (``[B]`` float32 sums over all
tokens), so the same code serves LlamaGen and VAR and is testable without a model.

Shapes: ``B`` samples of one micro-batch, ``L`` tokens, ``V`` vocabulary.

Conventions shared by both official codebases:
* Negatives are the labels rolled by -1 (``ỹ_i = y_{i+1}``); ``negatives="global_roll"`` rolls over
  the whole (global) micro-batch, so the pairing does not depend on the device count;
  ``"group_roll"`` rolls inside consecutive groups of ``roll_group`` rows, the official per-GPU
  micro-batch (2 for LlamaGen, 8/4/4/2 for VAR d16/d20/d24/d30).
* With ``uncond_ratio > 0`` a Bernoulli mask (TBM) sets *both* labels of a row to the null class,
  after the roll.
* Δ⁺ = ℓ_θ(x|y) − ℓ_ref(x|y), Δ⁻ = ℓ_θ(x|ỹ) − ℓ_ref(x|ỹ).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

LOSS_TYPES = ("cca", "dpo", "unlearning", "mle")
NEGATIVES = ("global_roll", "group_roll")
UNCOND_ZERO_FORMS = ("llamagen", "var")


@jax.custom_vjp
def token_logp_and_top1(logits_BLV: jax.Array, targets_BL: jax.Array):
    """``([B, L] float32 log p(target), [B, L] bool target is the top-1 logit)``.

    One pass for the max, one for Σexp; the target logit is picked with a masked sum rather than
    a gather, so a vocabulary sharded over devices needs only reductions. The custom gradient
    ``g·(onehot − softmax)`` recomputes the softmax from the logits and the saved ``[B, L]``
    log-normaliser instead of keeping a ``[B, L, V]`` exp array alive between the passes.
    """
    return _token_logp_fwd(logits_BLV, targets_BL)[0]


def _token_logp_fwd(logits_BLV, targets_BL):
    logits_BLV = logits_BLV.astype(jnp.float32)
    hit_BLV = jnp.arange(logits_BLV.shape[-1], dtype=jnp.int32) == \
        targets_BL[..., None].astype(jnp.int32)
    max_BL = jnp.max(logits_BLV, axis=-1)
    picked_BL = jnp.sum(jnp.where(hit_BLV, logits_BLV, 0.0), axis=-1)
    lse_BL = max_BL + jnp.log(jnp.sum(jnp.exp(logits_BLV - max_BL[..., None]), axis=-1))
    return (picked_BL - lse_BL, picked_BL >= max_BL), (logits_BLV, targets_BL, lse_BL)


def _token_logp_bwd(res, cts):
    logits_BLV, targets_BL, lse_BL = res
    g_BL = cts[0]
    hit_BLV = jnp.arange(logits_BLV.shape[-1], dtype=jnp.int32) == \
        targets_BL[..., None].astype(jnp.int32)
    p_BLV = jnp.exp(logits_BLV - lse_BL[..., None])
    d_BLV = g_BL[..., None] * (hit_BLV.astype(jnp.float32) - p_BLV)
    return d_BLV, None


token_logp_and_top1.defvjp(_token_logp_fwd, _token_logp_bwd)


def token_logp(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """``[B, L]`` float32 log-probability of each target token under ``log_softmax(logits)``."""
    return token_logp_and_top1(logits_BLV, targets_BL)[0]


def sequence_logp(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """``[B]`` float32: Σ_t log p(targets_t) — a sum over all tokens, no length normalisation."""
    return jnp.sum(token_logp(logits_BLV, targets_BL), axis=-1)


def token_metrics_from(logp_BL: jax.Array, top1_BL: jax.Array, *, last_l: int) -> dict:
    """VAR's MetricLogger values from per-token log-probs and top-1 hits (spec cca.md §4):
    ``Lm`` mean token cross-entropy, ``Lt`` the same over the last ``last_l`` tokens, ``Accm`` /
    ``Acct`` token top-1 accuracy in percent over all / the last tokens."""
    logp_BL = jax.lax.stop_gradient(logp_BL)
    hit_BL = top1_BL.astype(jnp.float32)
    return {
        "Lm": -jnp.mean(logp_BL),
        "Lt": -jnp.mean(logp_BL[:, -last_l:]),
        "Accm": 100.0 * jnp.mean(hit_BL),
        "Acct": 100.0 * jnp.mean(hit_BL[:, -last_l:]),
    }


def token_metrics(logits_BLV: jax.Array, targets_BL: jax.Array, *, last_l: int) -> dict:
    """:func:`token_metrics_from` computed from logits ``[B, L, V]``."""
    logp_BL, top1_BL = token_logp_and_top1(logits_BLV, targets_BL)
    return token_metrics_from(logp_BL, top1_BL, last_l=last_l)


def uncond_mask(rng: jax.Array, batch_size: int, uncond_ratio: float) -> jax.Array:
    """``[B]`` bool: rows whose labels become the null class (all False when the ratio is 0)."""
    if uncond_ratio <= 0.0:
        return jnp.zeros((batch_size,), bool)
    return jax.random.uniform(rng, (batch_size,)) < uncond_ratio


def roll_negatives(labels_B: jax.Array, *, negatives: str = "global_roll",
                   roll_group: int = 2) -> jax.Array:
    """``[B]`` negative labels ``ỹ_i = y_{i+1}`` (rolled by -1) over the batch or per group."""
    if negatives == "global_roll":
        return jnp.roll(labels_B, -1, axis=0)
    if negatives == "group_roll":
        B = labels_B.shape[0]
        if roll_group < 1 or B % roll_group:
            raise ValueError(
                f"config.loss.roll_group={roll_group} must divide the micro-batch of {B} rows "
                "(global_batch_size / grad_accum_steps); change loss.roll_group or the batch size.")
        return jnp.roll(labels_B.reshape(B // roll_group, roll_group), -1, axis=1).reshape(B)
    raise ValueError(f"config.loss.negatives={negatives!r}; expected one of {NEGATIVES}.")


class CCALabels(NamedTuple):
    pos_B: jax.Array  # labels of the positive condition (TBM rows -> null)
    neg_B: jax.Array  # rolled labels (TBM rows -> null)
    uncond_B: jax.Array  # bool TBM mask


def build_cca_labels(labels_B: jax.Array, *, null_label: int, rng: Optional[jax.Array] = None,
                     uncond_ratio: float = 0.0, mask_B: Optional[jax.Array] = None,
                     negatives: str = "global_roll", roll_group: int = 2) -> CCALabels:
    """Positive/negative labels of spec cca.md §2: roll first, then null-mask both copies.

    Pass either ``mask_B`` (a fixed TBM mask, e.g. from a fixture) or ``rng`` + ``uncond_ratio``.
    """
    labels_B = labels_B.astype(jnp.int32)
    neg_B = roll_negatives(labels_B, negatives=negatives, roll_group=roll_group)
    if mask_B is None:
        if rng is None and uncond_ratio > 0.0:
            raise ValueError("build_cca_labels: uncond_ratio > 0 needs rng (or an explicit mask_B).")
        mask_B = (uncond_mask(rng, labels_B.shape[0], uncond_ratio) if uncond_ratio > 0.0
                  else jnp.zeros(labels_B.shape, bool))
    mask_B = mask_B.astype(bool)
    null = jnp.int32(null_label)
    return CCALabels(pos_B=jnp.where(mask_B, null, labels_B), neg_B=jnp.where(mask_B, null, neg_B),
                     uncond_B=mask_B)


def drop_labels(rng: jax.Array, labels_B: jax.Array, *, rate: float, null_label: int) -> jax.Array:
    """Class-label dropout for maximum-likelihood training: each label -> null with prob ``rate``."""
    labels_B = labels_B.astype(jnp.int32)
    if rate <= 0.0:
        return labels_B
    drop_B = jax.random.uniform(rng, labels_B.shape) < rate
    return jnp.where(drop_B, jnp.int32(null_label), labels_B)


class LossOutput(NamedTuple):
    loss: jax.Array  # scalar float32
    metrics: dict  # scalars (see cca_loss)
    neg_weight_B: jax.Array  # bool: negative term acts as a positive (TBM or ỹ == y)
    mixed_weight_B: jax.Array  # float32: 1 where neg_weight else λ


def _mean(x):
    return jnp.mean(x.astype(jnp.float32))


def cca_loss(*, policy_pos_B: jax.Array, policy_neg_B: jax.Array, ref_pos_B: jax.Array,
             ref_neg_B: jax.Array, pos_labels_B: jax.Array, neg_labels_B: jax.Array,
             uncond_B: jax.Array, loss_type: str = "cca", beta: float = 0.02,
             lambda_: float = 1000.0, uncond_ratio: float = 0.1,
             uncond_zero_form: str = "llamagen", num_tokens: Optional[int] = None) -> LossOutput:
    """CCA / DPO / unlearning loss of one micro-batch (spec cca.md §3) and the logged metrics (§4).

    ``*_B`` inputs are ``[B]`` sequence log-likelihoods (policy / reference under the positive and
    negative labels), the labels actually fed to the models, and the TBM mask.

    The branch on ``uncond_ratio > 0`` is static, as in the official code (it selects the weighted
    form even in a batch where no row happens to be masked). For ``uncond_ratio == 0`` the two
    codebases differ: ``uncond_zero_form="llamagen"`` is the linear ``−mean Δ⁺ + λ mean Δ⁻``;
    ``"var"`` the sigmoid ``−mean log σ(βΔ⁺) − λ mean log σ(−βΔ⁻)``.

    Metrics: ``acc``, ``reward_margin``, ``chosen_reward``, ``rejected_reward``,
    ``uncond_reward`` (mean Δ⁻ over TBM rows; NaN when there is none, like the official code)
    with ``uncond_count``; with ``num_tokens`` (L) also the token-mean cross-entropies
    ``sft_loss``, ``shuffle_sft_loss``, ``ref_sft_loss``, ``ref_shuffle_sft_loss`` (VAR's logged
    "SFT" losses; −Σℓ / (B·L) equals the token mean of the official ``CrossEntropyLoss``).
    """
    if loss_type not in LOSS_TYPES or loss_type == "mle":
        raise ValueError(f"cca_loss: loss_type={loss_type!r}; expected cca | dpo | unlearning "
                         "(mle uses mle_loss).")
    if uncond_zero_form not in UNCOND_ZERO_FORMS:
        raise ValueError(f"config.loss.uncond_zero_form={uncond_zero_form!r}; expected one of "
                         f"{UNCOND_ZERO_FORMS}.")
    f32 = jnp.float32
    gap_B = (policy_pos_B - ref_pos_B).astype(f32)
    neg_gap_B = (policy_neg_B - ref_neg_B).astype(f32)
    uncond_B = uncond_B.astype(bool)
    neg_weight_B = uncond_B | (neg_labels_B == pos_labels_B)
    mixed_weight_B = jnp.where(neg_weight_B, f32(1.0), f32(lambda_))
    sign_B = neg_weight_B.astype(f32) * 2.0 - 1.0
    logsig = jax.nn.log_sigmoid
    div = max(float(lambda_), 1.0)

    if loss_type == "cca":
        if uncond_ratio > 0:
            loss = (-_mean(logsig(gap_B * beta))
                    - _mean(mixed_weight_B * logsig(sign_B * neg_gap_B * beta))) / div
        elif uncond_zero_form == "llamagen":
            loss = -_mean(gap_B) + lambda_ * _mean(neg_gap_B)
        else:
            loss = -_mean(logsig(gap_B * beta)) - lambda_ * _mean(logsig(-neg_gap_B * beta))
    elif loss_type == "dpo":
        loss = -_mean(logsig((gap_B - neg_gap_B) * beta))
    else:  # unlearning
        if uncond_ratio > 0:
            loss = (-_mean(gap_B) - _mean(mixed_weight_B * sign_B * neg_gap_B)) / div
        else:
            loss = -_mean(gap_B) + lambda_ * _mean(neg_gap_B)

    n_uncond = jnp.sum(uncond_B.astype(f32))
    metrics = {
        "acc": _mean(gap_B > neg_gap_B),
        "reward_margin": _mean(gap_B - neg_gap_B),
        "chosen_reward": _mean(gap_B),
        "rejected_reward": _mean(neg_gap_B),
        "uncond_reward": jnp.sum(jnp.where(uncond_B, neg_gap_B, 0.0)) / n_uncond,
        "uncond_count": n_uncond,
    }
    if num_tokens is not None:
        metrics.update({
            "sft_loss": -_mean(policy_pos_B) / num_tokens,
            "shuffle_sft_loss": -_mean(policy_neg_B) / num_tokens,
            "ref_sft_loss": -_mean(ref_pos_B) / num_tokens,
            "ref_shuffle_sft_loss": -_mean(ref_neg_B) / num_tokens,
        })
    return LossOutput(loss=loss.astype(f32), metrics=metrics, neg_weight_B=neg_weight_B,
                      mixed_weight_B=mixed_weight_B)


def mle_loss(*, logp_B: jax.Array, num_tokens: int) -> LossOutput:
    """Maximum likelihood (how references are pretrained): token-mean cross-entropy.

    ``logp_B`` are sequence log-likelihoods under (label-dropped) conditions; the loss
    ``−Σℓ / (B·L)`` is the mean over all tokens, as LlamaGen's and VAR's pretraining losses.
    """
    loss = -_mean(logp_B) / num_tokens
    B = logp_B.shape[0]
    ones = jnp.ones((B,), jnp.float32)
    return LossOutput(loss=loss, metrics={"sft_loss": loss}, neg_weight_B=ones.astype(bool),
                      mixed_weight_B=ones)
