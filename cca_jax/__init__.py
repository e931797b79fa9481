"""cca_jax: Condition Contrastive Alignment (arXiv 2410.09347) for LlamaGen and VAR in JAX."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU hands dots, convolutions and reductions to YNNPACK by default; its convolutions run the
# VQ tokenizers' 3x3 convs at 0.6x the speed of XLA's own kernels on x86 (`python -m
# cca_jax.bench.sample_var`: ch=160 decode of 8 images 27.3 s -> 19.8 s). Keep YNNPACK for dots and
# reductions only. Read once, when the CPU backend starts; ignored by TPU/GPU compilation; a user's
# own setting of the flag wins. Applied only on the jaxlib line it was measured with, because XLA
# aborts on flags it does not know.
_CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def _set_default_xla_flags() -> None:
    try:
        from jaxlib import version as _jaxlib_version
    except ImportError:
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if _jaxlib_version.__version__.startswith("0.10.") and "ynn_fusion_type" not in flags:
        _os.environ["XLA_FLAGS"] = f"{flags} {_CPU_XLA_FLAG}".strip()


_set_default_xla_flags()
