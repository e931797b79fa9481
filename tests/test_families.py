"""cca_jax.families: official keys of every parameter, weight-decay partitions, forwards."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import linen as nn

from cca_jax import families, optim
from configs.common import base_config


def var_config(shared_aln=False):
    c = base_config()
    c.model.update(dict(family="var", depth=2, embed_dim=32, num_heads=2, vocab_size=16, Cvae=4,
                        num_classes=10, patch_nums=(1, 2, 3), shared_aln=shared_aln))
    c.data.source = "synthetic"
    return c


def llamagen_config():
    c = base_config()
    c.model.update(dict(family="llamagen", dim=32, n_layer=2, n_head=2, vocab_size=64,
                        num_classes=10, block_size=16, multiple_of=32, class_dropout_prob=0.1))
    c.data.source = "synthetic"
    return c


def _official_partition_via_converter(fam, rule):
    """Reference partition: run the family's converter on id-filled leaves, read back which
    official key each leaf lands in, and apply the official rule on that key/shape."""
    abstract = nn.meta.unbox(fam.abstract_params())
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    ids = [np.full(x.shape, i + 1, np.float32) for i, x in enumerate(leaves)]
    sd = fam.to_state_dict(jax.tree_util.tree_unflatten(treedef, ids))
    where = {}
    for k, v in sd.items():
        for i in np.unique(v).astype(int):
            if i > 0:
                where.setdefault(i - 1, set()).add((k, v.ndim))
    assert set(where) == set(range(len(leaves))), "some parameter is not exported"
    out = []
    for i in range(len(leaves)):
        (key, ndim), = where[i]
        out.append(optim.ndim_decay(ndim) if rule == "ndim" else optim.var_decay(key, ndim))
    return jax.tree_util.tree_unflatten(treedef, out), sd


@pytest.mark.parametrize("cfg", [var_config(False), var_config(True), llamagen_config()],
                         ids=["var", "var_shared_aln", "llamagen"])
@pytest.mark.parametrize("rule", ["ndim", "var"])
def test_decay_mask_matches_the_official_rule_through_the_converter(cfg, rule):
    fam = families.from_config(cfg)
    abstract = nn.meta.unbox(fam.abstract_params())
    want, sd = _official_partition_via_converter(fam, rule)
    got = fam.decay_mask(abstract, rule)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    bad = [jax.tree_util.keystr(k) for (k, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)) if g != w]
    assert not bad, bad
    keys = set(jax.tree_util.tree_leaves(fam.official_keys(abstract)))
    assert keys == set(sd)


def test_var_partition_is_the_documented_one():
    fam = families.from_config(var_config())
    abstract = nn.meta.unbox(fam.abstract_params())
    mask = fam.decay_mask(abstract, "var")
    keys = fam.official_keys(abstract)
    decayed = {k for k, m in zip(jax.tree_util.tree_leaves(keys), jax.tree_util.tree_leaves(mask)) if m}
    assert decayed == {"word_embed.weight", "class_emb.weight", "head.weight",
                       "head_nm.ada_lin.1.weight",
                       *(f"blocks.{i}.{n}" for i in range(2) for n in (
                           "attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight",
                           "ffn.fc2.weight", "ada_lin.1.weight"))}
    with pytest.raises(ValueError, match="decay_rule"):
        fam.decay_mask(abstract, "all")


def test_llamagen_ndim_partition_excludes_only_norms():
    fam = families.from_config(llamagen_config())
    abstract = nn.meta.unbox(fam.abstract_params())
    mask = fam.decay_mask(abstract, "ndim")
    keys = fam.official_keys(abstract)
    off = {k for k, m in zip(jax.tree_util.tree_leaves(keys), jax.tree_util.tree_leaves(mask)) if not m}
    assert off and all("norm" in k for k in off)


def test_forwards_shapes_and_dropout_switch():
    cfg = var_config()  # the VAR path: random quantiser aux -> teacher-forcing input -> logits
    fam = families.from_config(cfg)
    aux = fam.make_aux(cfg, jax.random.key(1))
    B, L = 3, fam.num_tokens
    tokens = jax.random.randint(jax.random.key(2), (B, L), 0, fam.vocab_size)
    labels = jnp.array([0, 1, fam.null_label])
    logits = jax.jit(lambda k, t, y, a: fam.logits(fam.init_params(k), t, y, train=True,
                                                   rng=jax.random.key(3), aux=a))(
        jax.random.key(0), tokens, labels, aux)
    assert logits.shape == (B, L, fam.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert 0 < fam.matmul_params() < sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(
        nn.meta.unbox(fam.abstract_params())))
    cfg = llamagen_config()
    cfg.model.token_dropout_p = 0.3
    cfg.train.keep_dropout = False
    fam = families.from_config(cfg)
    assert fam.model_cfg.token_dropout_p == 0.0 and fam.model_cfg.class_dropout_prob == 0.1


def test_model_and_tokenizer_must_agree():
    c = var_config()
    c.tokenizer.update(dict(family="vqvae", vocab_size=32, z_channels=4, patch_nums=(1, 2, 3),
                            ch=32))
    with pytest.raises(ValueError, match="vocab_size"):
        families.from_config(c)
    c = var_config()
    c.model.family = "dit"
    with pytest.raises(ValueError, match="config.model.family"):
        families.from_config(c)
