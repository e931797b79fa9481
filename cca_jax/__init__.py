"""cca_jax: Condition Contrastive Alignment (arXiv 2410.09347) for LlamaGen and VAR in JAX."""

__version__ = "0.1.0"
