"""The digits feature network: a small MLP classifier trained by the demo in seconds.

It plays Inception's role for 8×8 digits: its penultimate activations (``features`` wide) are
the FID feature space, its logits give the share of samples classified as their conditioning
label. Inputs are uint8 images ``[B, 8, 8, C]`` (any C; channels are averaged), scaled to
[0, 1] exactly as the sample npz files store them, so real digits and samples go through the
same preprocessing.

Training: AdamW on a random 80/20 split of the 1,797 digits (the held-out accuracy is reported),
with light augmentation (Gaussian pixel noise and ±1-pixel shifts) so that the network is not
thrown by the continuous grey values the VQVAE decoder produces.

Shapes: ``B`` images, ``P = 64`` pixels, ``F`` features, ``K = 10`` classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 128  # first hidden layer width
    features: int = 32  # penultimate width = FID feature dimension
    steps: int = 600  # full-batch AdamW steps
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 0.05  # std of the Gaussian pixel noise (images in [0, 1])
    holdout: float = 0.2  # share of the digits kept out of training to measure accuracy
    seed: int = 0

    @classmethod
    def from_config(cls, c: Any) -> "ClassifierConfig":
        d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config.demo.classifier has unknown fields {unknown}; known: {sorted(names)}.")
        return cls(**d)


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class DigitsMLP(nn.Module):
    """``x [B, P]`` in [0, 1] -> ``(features [B, F], logits [B, K])``."""

    hidden: int = 128
    features: int = 32

    @nn.compact
    def __call__(self, x_BP: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(_dense(self.hidden, ("embed", "mlp"), "fc1")(x_BP))
        f = nn.relu(_dense(self.features, ("mlp", "embed"), "fc2")(h))
        return f, _dense(NUM_CLASSES, ("embed", "classes"), "head")(f)


def preprocess(images_BHWC) -> jax.Array:
    """uint8 ``[B, H, W, C]`` (or ``[B, H, W]``) -> ``[B, H·W]`` float32 in [0, 1]."""
    x = jnp.asarray(images_BHWC).astype(jnp.float32) / 255.0
    if x.ndim == 4:
        x = jnp.mean(x, axis=-1)
    return x.reshape(x.shape[0], -1)


def apply(params, images_BHWC, cfg: ClassifierConfig = ClassifierConfig()) -> dict:
    """``{"pool": features [B, F], "logits": [B, K]}`` of uint8 images (the
    :class:`cca_jax.evaluate.FeatureNet` interface)."""
    f, logits = DigitsMLP(cfg.hidden, cfg.features).apply({"params": params}, preprocess(images_BHWC))
    return {"pool": f, "logits": logits}


def _augment(key, x_BHW: jax.Array, noise: float) -> jax.Array:
    k1, k2 = jax.random.split(key)
    B = x_BHW.shape[0]
    shifts = jax.random.randint(k1, (B, 2), -1, 2)

    def shift_one(img, s):
        img = jnp.pad(img, 1)
        return jax.lax.dynamic_slice(img, (1 + s[0], 1 + s[1]), x_BHW.shape[1:])

    x = jax.vmap(shift_one)(x_BHW, shifts)
    return jnp.clip(x + noise * jax.random.normal(k2, x.shape), 0.0, 1.0)


def train(images_uint8: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig = ClassifierConfig()
          ) -> tuple[Any, dict]:
    """Trains on ``images [N, H, W(, C)]`` uint8 with ``labels [N]``; returns ``(params, report)``
    with ``report = {"train_accuracy", "holdout_accuracy", "num_train", "num_holdout"}``."""
    x = np.asarray(preprocess(images_uint8)).reshape(len(images_uint8), *images_uint8.shape[1:3])
    y = np.asarray(labels, np.int32)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(y))
    n_hold = int(round(cfg.holdout * len(y)))
    hold, tr = order[:n_hold], order[n_hold:]
    model = DigitsMLP(cfg.hidden, cfg.features)
    params = nn.meta.unbox(model.init(jax.random.key(cfg.seed), jnp.zeros((1, x.shape[1] * x.shape[2])))["params"])
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps, 0.05), weight_decay=cfg.weight_decay)
    opt = tx.init(params)
    xt, yt = jnp.asarray(x[tr]), jnp.asarray(y[tr])

    def loss_fn(p, key):
        xa = _augment(key, xt, cfg.noise).reshape(len(tr), -1)
        _, logits = model.apply({"params": p}, xa)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yt))

    @jax.jit
    def run(params, opt):
        def body(i, carry):
            p, o = carry
            g = jax.grad(loss_fn)(p, jax.random.fold_in(jax.random.key(cfg.seed + 1), i))
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o
        return jax.lax.fori_loop(0, cfg.steps, body, (params, opt))

    params, _ = run(params, opt)

    def acc(idx):
        if len(idx) == 0:
            return float("nan")
        _, logits = model.apply({"params": params}, jnp.asarray(x[idx]).reshape(len(idx), -1))
        return float(np.mean(np.argmax(np.asarray(logits), 1) == y[idx]))

    return params, {"train_accuracy": acc(tr), "holdout_accuracy": acc(hold),
                    "num_train": int(len(tr)), "num_holdout": int(n_hold)}


def feature_net(params, cfg: ClassifierConfig = ClassifierConfig()):
    """The classifier as a :class:`cca_jax.evaluate.FeatureNet` (pool features + logits)."""
    from cca_jax import evaluate
    return evaluate.FeatureNet(apply=lambda p, x: apply(p, x, cfg), params=params,
                               name=f"digits_mlp_{cfg.hidden}_{cfg.features}_s{cfg.seed}")
