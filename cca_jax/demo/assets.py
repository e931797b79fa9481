"""Rebuilds the demo's shipped assets (``cca_jax/demo/assets/``) from their configs.

    python -m cca_jax.demo.assets [--families=llamagen,var] [--workdir=runs/demo_assets]

* ``vqvae`` — the VAR family's tokenizer: ``configs/demo_tokenizer.py`` (architecture in
  ``configs/demo_pretrain_var.py``, training in ``config.demo.vqvae_train``);
* ``llamagen_ref`` / ``var_ref`` — the reference models: ``configs/demo_pretrain_<family>.py``
  (maximum likelihood with 10% label dropout through ``cca_jax/train.py``) on the digits' token
  shards, final params exported as Orbax params dirs.

Everything runs in ``--workdir`` through the demo's own stages (the same code ``make demo`` uses
with ``--config.demo.reference=pretrain``), then the exported dirs are copied into the assets
directory. Results match the shipped files up to floating-point differences between machines.
"""

from __future__ import annotations

import os
import shutil

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("families", "llamagen,var", "Which reference models to rebuild.")
flags.DEFINE_string("workdir", "runs/demo_assets", "Scratch directory (data shards, train runs).")
flags.DEFINE_string("out", "", "Assets directory ('' = cca_jax/demo/assets).")
flags.DEFINE_bool("tokenizer", True, "Also retrain the VAR family's VQVAE (needed by var_ref).")


def build(families: list[str], workdir: str, out: str, retrain_tokenizer: bool = True) -> dict:
    from configs import demo as demo_config
    from cca_jax.demo import pipeline

    config = demo_config.get_config()
    config.demo.families = ",".join(families)
    config.demo.assets_dir = out
    demo = pipeline.Demo(config, workdir)
    os.makedirs(out, exist_ok=True)
    written = {}
    for fam in demo.families():
        fam_cfg = config.demo[fam].pretrain
        if fam == "var" and retrain_tokenizer:
            _, vq_path = demo.vqvae(fam_cfg, force_train=True)
            _copy(vq_path, os.path.join(out, "vqvae"))
            written["vqvae"] = os.path.join(out, "vqvae")
        demo.dc.reference = "auto"  # the tokenizer: the one just written to the assets dir
        tok, _, vq_path = demo.tokenizer(fam, fam_cfg)
        demo._vq_path = vq_path  # noqa: SLF001
        channels = int(fam_cfg.tokenizer.get("in_channels", 3)) if fam == "var" else 1
        data_dir = demo.data(fam, tok, channels)
        demo.dc.reference = "pretrain"  # the reference: always retrained
        ref = demo.reference(fam, fam_cfg, data_dir)
        _copy(ref, os.path.join(out, f"{fam}_ref"))
        written[f"{fam}_ref"] = os.path.join(out, f"{fam}_ref")
    return written


def _copy(src: str, dst: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def main(argv):
    del argv
    from cca_jax.demo import pipeline
    out = FLAGS.out or pipeline.ASSETS_DIR
    fams = [f.strip() for f in FLAGS.families.split(",") if f.strip()]
    for name, path in build(fams, FLAGS.workdir, out, FLAGS.tokenizer).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    app.run(main)
