"""The embedded demo (``config.job = "demo"``, ``configs/demo.py``; the README's ``make demo``):
CCA on scikit-learn's bundled digits for both model families, on a CPU in minutes.

See :mod:`cca_jax.demo.pipeline` for the stages and outputs.
"""


def run(config, workdir: str):
    """``job=demo`` entry point (cca_jax/main.py)."""
    from cca_jax.demo import pipeline
    return pipeline.run(config, workdir)
