"""Mixed-precision matmuls: float32 accumulation forward and backward, 16-bit operands."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.models import matmul

SPECS = {  # dense layer, VAR's multi-axis head projection, attention logits and values
    "...i,io->...o": ((2, 5, 16), (16, 24)),
    "...ab,abc->...c": ((3, 4, 6), (4, 6, 10)),
    "blhd,bshd->bhls": ((2, 5, 3, 8), (2, 7, 3, 8)),
    "bhls,bshd->blhd": ((2, 3, 5, 7), (2, 7, 3, 8)),
}


def _operands(spec, seed=0):
    sa, sb = SPECS[spec]
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, sa), jax.random.normal(kb, sb)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_float32_is_plain_einsum(spec):
    a, b = _operands(spec)
    f = lambda a, b: jnp.sum(jnp.sin(matmul.einsum(spec, a, b)))
    g = lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b)))
    np.testing.assert_allclose(f(a, b), g(a, b), rtol=1e-6)
    for x, y in zip(jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_bf16_values_and_gradients_match_float64_of_rounded_operands(spec):
    a, b = _operands(spec, seed=1)
    w = jax.random.normal(jax.random.key(2), jnp.einsum(spec, a, b).shape)
    loss = lambda a, b: jnp.sum(w * matmul.einsum(spec, a, b, dtype=jnp.bfloat16,
                                                    out_dtype=jnp.float32))
    val, (da, db) = jax.value_and_grad(loss, (0, 1))(a, b)
    assert da.dtype == jnp.float32 and db.dtype == jnp.float32  # the operands' own dtypes
    # exact reference: operands rounded to bf16, then float64; the cotangent w rounded to bf16
    # as the 16-bit backward does
    r = lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64)
    a64, b64 = r(a), r(b)
    # batched products (attention) keep autodiff's backward: a float32 cotangent, not rounded
    w64 = np.asarray(w, np.float64) if matmul._has_batch_axes(spec) else r(w)
    # numpy's einsum does not sum an ellipsis missing from the output: spell it out
    n_ell = a.ndim - (len(spec.split(",")[0]) - 3) if "..." in spec else 0
    explicit = spec.replace("...", "XYZ"[:n_ell])
    inputs, out = explicit.split("->")
    sa, sb = inputs.split(",")
    ref_val = np.sum(np.asarray(w, np.float64) * np.einsum(explicit, a64, b64))
    ref_da = np.einsum(f"{out},{sb}->{sa}", w64, b64)
    ref_db = np.einsum(f"{sa},{out}->{sb}", a64, w64)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    # float32 accumulation of exact bf16 products: far tighter than a bf16 rounding (4e-3);
    # autodiff's batched backward rounds the gradients to the bf16 operands' dtype
    tol = 8e-3 if matmul._has_batch_axes(spec) else 1e-5
    np.testing.assert_allclose(da, ref_da, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, ref_db, rtol=tol, atol=tol)


def test_batch_axes_are_detected():
    assert not matmul._has_batch_axes("...i,io->...o")
    assert not matmul._has_batch_axes("...ab,abc->...c")
    assert not matmul._has_batch_axes("bd,dnc->bnc")
    assert matmul._has_batch_axes("blhd,bshd->bhls")
    assert matmul._has_batch_axes("...i,...io->...o")


def test_bf16_result_is_rounded_float32_accumulation():
    a, b = _operands("...i,io->...o", seed=3)
    out = matmul.einsum("...i,io->...o", a, b, dtype=jnp.bfloat16)
    want = jnp.einsum("...i,io->...o", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def _dots(hlo: str) -> list[tuple[str, list[str]]]:
    """(output dims, dtypes of its two operands) for each float32-output dot of an HLO module."""
    lines = hlo.splitlines()
    dtype_of = {}
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[", line)
        if m:
            dtype_of[m.group(1)] = m.group(2)
    out = []
    for line in lines:
        m = re.search(r"= f32\[([^\]]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
        if m:
            out.append((m.group(1), (dtype_of[m.group(2)], dtype_of[m.group(3)])))
    return out


def _dense_grad_hlo(x_shape, w_shape):
    def loss(a, b):
        h = matmul.einsum("...i,io->...o", a, b, dtype=jnp.bfloat16)
        return jnp.sum(jnp.square(h.astype(jnp.float32)))

    a, b = jnp.ones(x_shape), jnp.ones(w_shape)
    return jax.jit(jax.grad(loss, (0, 1))).lower(a, b).as_text(dialect="hlo"), loss, a, b


def test_bf16_forward_and_input_gradient_dots_take_bf16_operands():
    """The forward and input-gradient products multiply bf16 by bf16 into float32 (not the
    upcast float32 dots autodiff of a ``preferred_element_type`` einsum gives); on CPU the weight
    gradient is a float32 dot of bf16-rounded operands (XLA:CPU has no fallback kernel for it)."""
    hlo, *_ = _dense_grad_hlo((4, 16, 32), (32, 48))
    dots = _dots(hlo)
    assert len(dots) == 3, dots
    operands = {dims: types for dims, types in dots}
    assert operands == {"4,16,48": ("bf16", "bf16"),  # forward
                        "4,16,32": ("bf16", "bf16"),  # d/dx
                        "32,48": ("f32", "f32")}, dots  # d/dW, on this CPU backend


@pytest.mark.parametrize("x_shape,w_shape", [((1, 32), (32, 48)), ((8, 3), (3, 5)),
                                             ((2, 7, 16), (16, 1)), ((8, 64), (64, 3072))])
def test_bf16_small_and_vector_products_run_on_cpu(x_shape, w_shape):
    """Shapes XLA:CPU's bf16 kernels decline (vectors, tiny dims, a per-sample projection whose
    weight gradient contracts over a batch of 8) still compile and run, with the 16-bit numbers."""
    _, loss, _, _ = _dense_grad_hlo(x_shape, w_shape)
    a = jax.random.normal(jax.random.key(5), x_shape)
    b = jax.random.normal(jax.random.key(6), w_shape)
    val, (da, db) = jax.jit(jax.value_and_grad(loss, (0, 1)))(a, b)
    r = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)
    h = r(np.asarray(r(a) @ r(b), np.float32))  # rounded product, as the layer returns it
    np.testing.assert_allclose(val, np.sum(h * h), rtol=1e-4)
    g = r(2 * h)  # cotangent of the bf16 output, cast to bf16
    # float32 accumulation: error bounded by ~1e-6 of the summed magnitudes
    a2, g2 = r(a).reshape(-1, w_shape[0]), g.reshape(-1, w_shape[1])
    np.testing.assert_allclose(da, g @ r(b).T, rtol=0, atol=1e-6 * np.max(abs(g) @ abs(r(b)).T))
    np.testing.assert_allclose(db, a2.T @ g2, rtol=0, atol=1e-6 * np.max(abs(a2).T @ abs(g2)))


def test_float32_products_ask_for_full_precision():
    # on TPU/GPU JAX's default float32 matmul is one bf16 pass / TF32: parity needs HIGHEST
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    text = jax.jit(lambda a, b: matmul.einsum("bi,io->bo", a, b)).lower(x, w).as_text()
    assert "HIGHEST" in text
    q = jnp.ones((2, 4, 3, 8))
    text = jax.jit(lambda a, b: matmul.einsum("blhd,bshd->bhls", a, b)).lower(q, q).as_text()
    assert "HIGHEST" in text


@pytest.mark.parametrize("x_shape,k_shape,in_axes,spec", [
    ((2, 5, 16), (16, 24), 1, "...i,io->...o"),
    ((3, 4, 6), (4, 6, 10), 2, "...ab,abc->...c"),
    ((2, 5, 16), (16, 3, 8), 1, "...i,ihd->...hd"),
    ((16,), (16, 4), 1, "i,io->o"),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_is_the_einsum_over_trailing_axes(x_shape, k_shape, in_axes, spec, dtype):
    x = jax.random.normal(jax.random.key(0), x_shape)
    k = jax.random.normal(jax.random.key(1), k_shape)
    w = jax.random.normal(jax.random.key(2), jnp.einsum(spec, x, k).shape)
    f = lambda x, k: jnp.sum(w * matmul.dense(x, k, in_axes=in_axes, dtype=dtype))
    g = lambda x, k: jnp.sum(w * matmul.einsum(spec, x, k, dtype=dtype))
    assert matmul.dense(x, k, in_axes=in_axes, dtype=dtype).shape == jnp.einsum(spec, x, k).shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(f(x, k), g(x, k), rtol=tol, atol=tol)
    for a, b in zip(jax.grad(f, (0, 1))(x, k), jax.grad(g, (0, 1))(x, k)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_dense_rejects_mismatched_input_axes():
    with pytest.raises(ValueError, match=r"input axes \(5, 16\) do not match the kernel's \(4, 16\)"):
        matmul.dense(jnp.ones((2, 5, 16)), jnp.ones((4, 16, 3)), in_axes=2)


@pytest.mark.parametrize("y_shape,b_shape", [((4, 6, 24), (24,)), ((3, 5, 4, 8), (4, 8)),
                                             ((2, 9, 1), (1,))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_matches_autodiff_of_the_plain_add(y_shape, b_shape, dtype):
    ky, kb, kg = jax.random.split(jax.random.key(1), 3)
    y = jax.random.normal(ky, y_shape).astype(dtype)
    bias = jax.random.normal(kb, b_shape)  # a float32 master parameter
    # small integers: every partial sum is exact, so any summation order gives the same bits
    g = jax.random.randint(kg, y_shape, -8, 9).astype(dtype)
    mine = jax.vjp(matmul.add_bias, y, bias)
    plain = jax.vjp(lambda y, b: y + b.astype(y.dtype), y, bias)
    assert mine[0].dtype == dtype
    np.testing.assert_array_equal(np.asarray(mine[0], np.float32), np.asarray(plain[0], np.float32))
    (dy, db), (dy_ref, db_ref) = mine[1](g), plain[1](g)
    assert db.dtype == jnp.float32 and db.shape == b_shape and dy.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dy, np.float32), np.asarray(dy_ref, np.float32))
    np.testing.assert_array_equal(db, db_ref)
    # the column sum of general values: float32 accumulation, rounded to the compute dtype
    g = jax.random.normal(kg, y_shape).astype(dtype)
    want = np.asarray(g, np.float64).reshape(-1, *b_shape).sum(0)
    tol = 2.0 ** -8 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(mine[1](g)[1], want, rtol=tol, atol=tol * np.abs(want).max())


def test_bf16_bias_gradient_is_a_dot_not_a_reduction():
    """XLA:CPU splits a 16-bit column sum into a slow reduce-window; the bias gradient is the
    product ones @ g instead."""
    y, bias = jnp.ones((4, 64, 32), jnp.bfloat16), jnp.zeros((32,))
    grad = jax.grad(lambda b, y: jnp.sum(matmul.add_bias(y, b).astype(jnp.float32) ** 2))
    jaxpr = str(jax.make_jaxpr(grad)(bias, y))
    assert "dot_general" in jaxpr and jaxpr.count("reduce_sum") == 1  # the loss's own sum
    plain = jax.grad(lambda b, y: jnp.sum((y + b.astype(y.dtype)).astype(jnp.float32) ** 2))
    assert str(jax.make_jaxpr(plain)(bias, y)).count("reduce_sum") >= 2
