"""Entry point: ``python -m cca_jax.main --config=configs/<recipe>.py --workdir=DIR``.

The config's ``job`` field picks what runs; each job is a library function ``run(config, workdir)``.
"""

import importlib
import importlib.util

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...): checkpoints, logs, outputs.")
flags.mark_flags_as_required(["config", "workdir"])

# job name -> module whose run(config, workdir) implements it
JOBS = {
    "train": "cca_jax.train",
    "sample": "cca_jax.sampling.job",
    "eval": "cca_jax.evaluate",
    "tokenize": "cca_jax.data.tokenize",
    "convert": "cca_jax.convert.job",
    "plan": "cca_jax.plan",
    "demo": "cca_jax.demo",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r}; choose one of {sorted(JOBS)}.")
    from cca_jax import distributed
    distributed.initialize()
    from cca_jax import host_malloc
    logging.info("job=%s workdir=%s; %s", config.job, FLAGS.workdir, host_malloc.describe())
    importlib.import_module(JOBS[config.job]).run(config, FLAGS.workdir)


# jobs that run one large XLA program per step, whose temporaries glibc would unmap and fault
# back in every step on a CPU host (cca_jax/host_malloc.py; sampling loops gain nothing)
KEEP_HOST_MEMORY_JOBS = ("train",)


def _peek_job(argv: list[str]) -> str:
    """``config.job`` before absl parses the flags (a malloc re-exec must come first): an explicit
    ``--config.job=...``, else the recipe's ``get_config().job``; ``""`` when it cannot tell."""
    for a in argv:
        if a.startswith("--config.job="):
            return a.split("=", 1)[1]
    for i, a in enumerate(argv):
        path = a.split("=", 1)[1] if a.startswith("--config=") else (
            argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        if path:
            try:
                file, _, arg = path.partition(":")
                spec = importlib.util.spec_from_file_location("_cca_jax_peek_config", file)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                config = module.get_config(arg) if arg else module.get_config()
                return str(config.get("job", ""))
            except Exception:  # absl reports a bad config file properly, right after
                return ""
    return ""


if __name__ == "__main__":
    import sys

    from cca_jax import host_malloc
    if _peek_job(sys.argv[1:]) in KEEP_HOST_MEMORY_JOBS:
        host_malloc.reexec_if_wanted()
    app.run(main)
