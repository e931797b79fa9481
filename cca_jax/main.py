"""Entry point: ``python -m cca_jax.main --config=configs/<recipe>.py --workdir=DIR``.

The config's ``job`` field picks what runs; each job is a library function ``run(config, workdir)``.
"""

import importlib

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


if __name__ == "__main__":
    from cca_jax import host_malloc
    host_malloc.reexec_if_wanted()  # on a CPU host: stop XLA's per-step page faults (see module)
    app.run(main)
