"""Sampler class labels: the official label_B forms and the range check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.sampling import class_labels


def test_none_draws_uniform_classes_with_a_split_key():
    rng = jax.random.key(0)
    labels, rest = class_labels.resolve(None, rng, num_classes=10, batch=4000)
    labels = np.asarray(labels)
    assert labels.shape == (4000,) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9  # classes only, never the null class
    assert np.abs(np.bincount(labels, minlength=10) / 4000 - 0.1).max() < 0.03
    again, _ = class_labels.resolve(None, rng, num_classes=10, batch=4000)
    np.testing.assert_array_equal(labels, np.asarray(again))  # seeded
    assert not np.array_equal(jax.random.key_data(rest), jax.random.key_data(rng))


def test_int_is_one_class_for_all_and_negative_is_unconditional():
    rng = jax.random.key(1)
    labels, rest = class_labels.resolve(7, rng, num_classes=10, batch=3)
    np.testing.assert_array_equal(np.asarray(labels), [7, 7, 7])
    assert np.array_equal(jax.random.key_data(rest), jax.random.key_data(rng))  # key untouched
    np.testing.assert_array_equal(np.asarray(class_labels.resolve(-1, rng, num_classes=10, batch=2)[0]),
                                  [10, 10])


def test_arrays_pass_and_bad_labels_are_named():
    rng = jax.random.key(2)
    np.testing.assert_array_equal(
        np.asarray(class_labels.resolve(np.array([0, 9, 10]), rng, num_classes=10)[0]), [0, 9, 10])
    with pytest.raises(ValueError, match=r"outside \[0, 10\]: \[11, 1000\].*null"):
        class_labels.resolve(np.array([3, 11, 1000]), rng, num_classes=10)
    with pytest.raises(ValueError, match=r"outside \[0, 9\]: \[10\].*no null class"):
        class_labels.resolve(jnp.array([10]), rng, num_classes=10, allow_null=False)
    with pytest.raises(ValueError, match="outside"):
        class_labels.resolve(np.array([-2]), rng, num_classes=10)
    with pytest.raises(ValueError, match="1-D integer"):
        class_labels.resolve(np.array([1.0, 2.0]), rng, num_classes=10)
    with pytest.raises(ValueError, match="needs batch"):
        class_labels.resolve(None, rng, num_classes=10)
    with pytest.raises(ValueError, match="3 labels but batch=2"):
        class_labels.resolve(np.array([1, 2, 3]), rng, num_classes=10, batch=2)


def test_traced_labels_pass_through():
    f = jax.jit(lambda l: class_labels.resolve(l, jax.random.key(0), num_classes=10)[0] + 1)
    np.testing.assert_array_equal(np.asarray(f(jnp.array([20, 3]))), [21, 4])
