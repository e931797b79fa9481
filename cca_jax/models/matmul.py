"""Matmuls in a compute dtype with float32 accumulation, forward and backward.

Mixed precision (``config.train.compute_dtype = "bfloat16"``) means what PyTorch autocast and
the TPU MXU do: 16-bit operands, float32 accumulation, the product rounded to 16 bits. Written as
a plain ``einsum`` on bf16 operands it is not that on CPU: XLA:CPU runs a bf16-output dot at a
third of the float32 speed, and autodiff turns the backward products into float32 dots (the
cotangent of a ``preferred_element_type=float32`` dot is float32). :func:`einsum` asks for float32
accumulation explicitly and gives the input-gradient product 16-bit operands too (the cotangent
is cast to the compute dtype, as autocast's bf16 ``grad_output`` is). On this CPU a
``[2056, 512] @ [512, 1536]`` product runs at 361 GFLOP/s that way, against 109 as a bf16-output
dot and 190 in float32 (``python -m cca_jax.bench.step --dtype bfloat16``).

XLA:CPU caveat, handled here: only its YNNPACK kernels multiply bf16 x bf16 into float32; a dot
they decline (a dimension < 8, a vector, an operand whose contracting axis is not its minor one)
falls to a fallback kernel that fails at run time ("Unsupported element type for
DotThunk::Execute: BF16 x BF16 = F32"). So on CPU a product that could be declined runs as a
float32 dot of the bf16-rounded operands: the same numbers (bf16 products are exact in float32),
the float32 speed. That covers small products and the weight gradient (it contracts over the
tokens, the major axis of both operands; in bf16 it is no faster here anyway).

In float32 it is ``jnp.einsum`` with float32 accumulation and ``Precision.HIGHEST`` (true float32
products on TPU/GPU too, where JAX's default is one bf16 pass or TF32).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

# smallest m, k and n of a 16-bit product sent to XLA:CPU's bf16 kernels off the forward path
_CPU_MIN_DIM = 16


def einsum(spec: str, a: jax.Array, b: jax.Array, *, dtype: Any = jnp.float32,
           out_dtype: Any = None) -> jax.Array:
    """``einsum(spec, a, b)`` with both operands cast to ``dtype`` and float32 accumulation.

    spec: a two-operand einsum ``"<a>,<b>-><out>"`` where every index of ``a`` appears in ``b`` or
      the output and likewise for ``b`` (true of every dense layer and attention product); ``a``
      holds activations, ``b`` the weight. In a 16-bit ``dtype`` only products without batch
      axes (dense layers) get the 16-bit backward; batched ones (attention) keep autodiff's.
    out_dtype: result dtype (default ``dtype``); e.g. float32 for attention logits.
    Gradients come back in ``a``'s and ``b``'s own dtypes (a float32 master weight gets a float32
    gradient, accumulated in float32).
    """
    out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
    if jnp.dtype(dtype).itemsize >= 4 or _has_batch_axes(spec):
        # float32 means float32 on every backend: JAX's default would run one bf16 pass on TPU
        # (TF32 on GPU), 1e-3 off the official fp32 numbers; 16-bit operands are exact either way
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                          preferred_element_type=jnp.float32).astype(out_dtype)
    return _low_precision_einsum(spec, jnp.dtype(dtype), out_dtype, a, b)



def dense(x: jax.Array, kernel: jax.Array, *, in_axes: int = 1, dtype: Any = jnp.float32) -> jax.Array:
    """``x [..., *I] @ kernel [*I, *O] -> [..., *O]`` as one 2-D product ``[M, prod I] @ [prod I,
    prod O]`` (``M`` = the leading axes of ``x``), through :func:`einsum` (same dtype rules).

    Why flatten: the weight gradient of a product over ``[B, L, C]`` contracts two axes (B, L);
    XLA canonicalises a multi-axis contraction by transposing the operand into a copy (on CPU an
    elementwise-fused, strided copy of every FFN activation: 70 ms per layer at BENCH-LLAMAGEN),
    while a single contracted axis runs as a transposed-operand GEMM without any copy. The
    reshapes are free (row-major) and keep a sharded leading (batch) axis sharded.
    """
    lead, ins, outs = x.shape[:x.ndim - in_axes], kernel.shape[:in_axes], kernel.shape[in_axes:]
    if tuple(x.shape[x.ndim - in_axes:]) != tuple(ins):
        raise ValueError(f"dense: input axes {x.shape[x.ndim - in_axes:]} do not match the "
                         f"kernel's {ins} (kernel {kernel.shape}, in_axes={in_axes}).")
    y = einsum("mi,io->mo", x.reshape(math.prod(lead), math.prod(ins)),
               kernel.reshape(math.prod(ins), math.prod(outs)), dtype=dtype)
    return y.reshape(tuple(lead) + tuple(outs))


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y [..., *O] + bias [*O]`` in ``y``'s dtype; the bias gradient comes back in ``bias``'s.

    The bias gradient is the column sum of the cotangent ``g [M, prod O]``. For a 16-bit ``y`` on
    CPU, XLA converts ``g`` to a float32 copy and splits the sum into a ``reduce-window`` that
    runs at about 1 GB/s (0.9 s of the bf16 BENCH-VAR step); here it is the product
    ``ones [8, M] @ g`` with float32 accumulation instead, a YNNPACK dot reading ``g`` once. Same
    numbers: a float32 sum of the 16-bit values, rounded to ``y``'s dtype as autodiff's is.
    """
    if jnp.dtype(y.dtype).itemsize >= 4 or jax.default_backend() != "cpu":
        return y + bias.astype(y.dtype)
    return _add_bias_16bit(y, bias)


@jax.custom_vjp
def _add_bias_16bit(y, bias):
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    # a zero-size [0, *O] array carries the bias's shape and dtype to the backward pass
    return _add_bias_16bit(y, bias), jnp.zeros((0,) + bias.shape, bias.dtype)


def _add_bias_bwd(bias_like, g):
    out_shape = bias_like.shape[1:]
    n = math.prod(out_shape)
    g_MN = g.reshape(-1, n)
    rows = 8  # YNNPACK declines a vector operand; 8 equal rows cost nothing next to reading g
    if _fast("rm,mn->rn", (rows, g_MN.shape[0]), g_MN.shape, forward=True):
        col_sum = jnp.dot(jnp.ones((rows, g_MN.shape[0]), g.dtype), g_MN,
                          preferred_element_type=jnp.float32)[0]
    else:
        col_sum = jnp.sum(g_MN.astype(jnp.float32), axis=0)
    db = col_sum.astype(g.dtype).astype(bias_like.dtype).reshape(out_shape)
    return g, db


_add_bias_16bit.defvjp(_add_bias_fwd, _add_bias_bwd)


def cast_kernels(params: Any, dtype: Any, *, keep: tuple[str, ...] = ()) -> Any:
    """``params`` with every dense ``kernel`` leaf cast to ``dtype`` once, other leaves as they are.

    For decoding loops: a layer casts its float32 kernel to the compute dtype on every call, and
    inside a ``fori_loop`` XLA:CPU redoes that cast each step, reading the float32 weights (twice
    the bytes) for a step that is bound by weight traffic. Cast up front, a step reads 16-bit
    weights and computes the same numbers (the layer's cast becomes a no-op). ``keep``: names of
    modules whose kernels the model multiplies in float32 whatever ``dtype`` (VAR's
    ``FLOAT32_KERNELS``); they stay as they are. A float32 ``dtype`` returns ``params`` unchanged.
    """
    if jnp.dtype(dtype).itemsize >= 4:
        return params

    def cast(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names and names[-1] == "kernel" and not any(n in keep for n in names):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def _has_batch_axes(spec: str) -> bool:
    """Whether some index (or ``...``) is in both operands and the output: a batched dot."""
    inputs, out = spec.replace("...", "*").split("->")
    sa, sb = inputs.split(",")
    return any(c in sb and c in out for c in sa)


def _mkn(spec: str, a_shape, b_shape) -> tuple[int, int, int]:
    """(m, k, n) of the 2-D product a non-batched ``spec`` is: free size of a, contracted size,
    free size of b."""
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    ell = len(a_shape) - len(sa.replace("...", ""))
    sa = sa.replace("...", "ABCDEFGH"[:ell])  # one name per axis the ellipsis stands for
    sizes = dict(zip(sa, a_shape))
    sizes.update(zip(sb, b_shape))
    m = math.prod(sizes[c] for c in sa if c not in sb)
    k = math.prod(sizes[c] for c in sa if c in sb)
    n = math.prod(sizes[c] for c in sb if c not in sa)
    return m, k, n


def _upcast_einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """float32 einsum of the operands rounded to ``dtype``: the 16-bit product's numbers."""
    r = lambda x: x.astype(dtype).astype(jnp.float32)
    return jnp.einsum(spec, r(a), r(b), preferred_element_type=jnp.float32)


def _fast(spec: str, a_shape, b_shape, *, forward: bool) -> bool:
    """Whether a 16-bit product of these shapes may use a bf16 x bf16 -> float32 dot."""
    if jax.default_backend() != "cpu":
        return True
    m, k, n = _mkn(spec, a_shape, b_shape)
    if forward:  # row-major [m, k] @ [k, n]: YNNPACK takes it unless a vector or tiny
        return m >= 2 and n >= 2 and max(m, k, n) >= 8
    return min(m, k, n) >= _CPU_MIN_DIM


def _product(spec, dtype, a, b, *, forward):
    if _fast(spec, a.shape, b.shape, forward=forward):
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return _upcast_einsum(spec, a, b, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _low_precision_einsum(spec, dtype, out_dtype, a, b):
    return _product(spec, dtype, a, b, forward=True).astype(out_dtype)


def _fwd(spec, dtype, out_dtype, a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    out = _product(spec, dtype, a_c, b_c, forward=True).astype(out_dtype)
    # the 16-bit copies are the residuals (half the memory); zero-size arrays carry the dtypes
    return out, (a_c, b_c, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _bwd(spec, dtype, out_dtype, res, g):
    a_c, b_c, a_like, b_like = res
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(dtype)
    # input gradient [m, n] @ [n, k]: 16-bit operands; weight gradient: contracts over m
    da = _product(f"{out},{sb}->{sa}", dtype, g, b_c, forward=False)
    db = _upcast_einsum(f"{sa},{out}->{sb}", a_c, g, dtype)
    return da.astype(a_like.dtype), db.astype(b_like.dtype)


_low_precision_einsum.defvjp(_fwd, _bwd)
