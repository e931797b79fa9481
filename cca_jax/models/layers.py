"""Small layers shared by the transformers (LlamaGen now, VAR later): norms, dense, FFN, drop path.

Every parameter is created through ``nn.with_logical_partitioning`` with names from
``cca_jax/sharding.py``; parameters are stored in ``param_dtype`` (float32) and cast to the
compute ``dtype`` inside the layer, which mirrors PyTorch autocast (fp32 master weights, bf16
matmuls).

Shapes: ``B`` batch, ``L`` tokens, ``C`` width, ``F`` FFN hidden width.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cca_jax.models import matmul

Dtype = Any
Initializer = Callable[..., jax.Array]

ACT_BLC = ("act_batch", "act_length", "act_embed")
ACT_BLF = ("act_batch", "act_length", "act_mlp")


def normal_init(stddev: float) -> Initializer:
    """Plain (not truncated) ``N(0, stddev²)``: what ``tensor.normal_(0, std)`` does in PyTorch."""
    return nn.initializers.normal(stddev=stddev)


class Dense(nn.Module):
    """``y = x @ kernel (+ bias)`` over the last axis: kernel ``[C_in, C_out]``, bias ``[C_out]``
    (the parameter names and shapes of ``nn.Dense``), computed by :func:`matmul.dense` in
    ``dtype`` with float32 accumulation; parameters stay ``param_dtype``."""

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = matmul.dense(x, kernel, dtype=self.dtype)
        if self.use_bias:
            y = matmul.add_bias(y, self.param("bias", self.bias_init, (self.features,),
                                               self.param_dtype))
        return y


def dense(features: int, axes: tuple[str, str], *, dtype: Dtype = jnp.float32,
          kernel_init: Initializer = nn.initializers.lecun_normal(), use_bias: bool = False,
          bias_init: Initializer = nn.initializers.zeros, bias_axes: tuple[str] | None = None,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> Dense:
    """:class:`Dense` whose kernel ``[C_in, C_out]`` (and optional bias ``[C_out]``) carry logical names.

    axes: logical names of ``(C_in, C_out)``, e.g. ``("embed", "mlp")``.
    bias_axes: logical name of the bias; defaults to ``(axes[1],)``.
    Computation runs in ``dtype`` (inputs and kernel are cast), parameters stay ``param_dtype``.
    """
    return Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, bias_axes or (axes[1],)),
        name=name)


def embed(num_embeddings: int, features: int, axes: tuple[str, str], *,
          embedding_init: Initializer, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Embed:
    """``nn.Embed`` (table ``[num_embeddings, features]``) with logical names on the table.

    The lookup returns ``param_dtype`` (float32): PyTorch autocast leaves embeddings in fp32, so
    the residual stream they start stays fp32.
    """
    return nn.Embed(num_embeddings, features, dtype=param_dtype, param_dtype=param_dtype,
                    embedding_init=nn.with_logical_partitioning(embedding_init, axes), name=name)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: ``cast(x32 * rsqrt(mean(x32²) + eps), x.dtype) * weight``.

    The cast back to the input dtype happens *before* the weight multiply, as in the official
    LlamaGen code (it matters when activations are bf16). Weight ``[C]`` is initialised to ones.
    """

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * weight.astype(x.dtype)


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``dropout(w2(silu(w1 x) * w3 x))``; ``[B, L, C] -> [B, L, C]`` in ``dtype``.

    w1 is the gated branch (inside SiLU), w3 the linear one. No biases.
    """

    hidden: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init(0.02)

    @nn.compact
    def __call__(self, x_BLC: jax.Array, *, deterministic: bool = True) -> jax.Array:
        C = x_BLC.shape[-1]
        gate = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.kernel_init,
                     name="w1")(x_BLC)
        lin = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.kernel_init,
                    name="w3")(x_BLC)
        h_BLF = nn.with_logical_constraint(nn.silu(gate) * lin, ACT_BLF)
        out = dense(C, ("mlp", "embed"), dtype=self.dtype, kernel_init=self.kernel_init,
                    name="w2")(h_BLF)
        return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with prob ``rate``, scale by 1/keep.

    Draws from the ``'dropout'`` rng stream; each call draws a fresh mask (the official block
    uses one DropPath module for both branches, with independent draws).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)) if keep > 0.0 else x * 0


def drop_path_rates(max_rate: float, n_layer: int) -> Sequence[float]:
    """``linspace(0, max_rate, n_layer)`` as Python floats (the official per-layer schedule)."""
    if n_layer == 1:
        return [0.0]
    return [max_rate * i / (n_layer - 1) for i in range(n_layer)]
