"""The embedded demo: CCA on scikit-learn's digits, both model families, in minutes on a CPU.

``run(config, workdir)`` (``config.job = "demo"``, ``configs/demo.py``) runs these stages, each
cached in ``workdir`` so that a rerun skips what is finished (an interrupted run loses at most
the stage it was in):

1. **digits** — the 1,797 8×8 images (17 grey levels) from ``cca_jax/data/digits.py``.
2. **classifier** — the digits feature network (``classifier.py``): FID feature space and label
   accuracy. ``<workdir>/classifier/``.
3. per family (``config.demo.families``):

   a. **tokenizer** — LlamaGen: per-pixel grey-level tokens (no parameters); VAR: the tiny
      multi-scale VQVAE, shipped in ``cca_jax/demo/assets/vqvae`` or trained here
      (``config.demo.reference = "pretrain"`` or no asset).
   b. **data** — the digits through the repository's shard writer (``cca_jax/data``), read back
      by the train step's shard reader. ``<workdir>/data/<family>/``.
   c. **reference** — the class-conditional model pretrained with label dropout (``loss.type =
      "mle"``; ``configs/demo_pretrain_<family>.py``): shipped asset, or pretrained here into
      ``<workdir>/pretrain_<family>/``.
   d. **cca** — one CCA fine-tune per λ in ``config.demo.<family>.cca.lambdas`` through the
      real train step (``cca_jax/train.py``), from the reference. ``<workdir>/cca_<family>_lam<λ>/``.
   e. **sample** — base model guidance-free, base with CFG at every
      ``config.demo.<family>.cfg_scales``, each CCA model guidance-free; ADM-format npz
      (``arr_0`` uint8 N×8×8×3, ``labels``) + PNG grid per mode in ``<workdir>/samples/``.
   f. **evaluate** — FID in the classifier's feature space, per-class FID (mean over the 10
      classes), accuracy (share classified as their label), Inception-style score, precision /
      recall, and sampling time per image.
4. **report** — the table (stdout, ``results.md``, ``results.json``), TensorBoard scalars and
   image grids (``<workdir>/tensorboard``), and ``tradeoff.png`` (FID and accuracy against λ and
   against the CFG scale, and FID against accuracy for both sweeps).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

FAMILIES = ("llamagen", "var")
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


# ==================================================================================== helpers

def _print(msg: str) -> None:
    print(msg, flush=True)
    logging.info("%s", msg)


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def _write_json(path: epath.Path, obj: Any) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
    tmp.replace(path)


def _save_npz(path: epath.Path, **arrays) -> None:
    tmp = path.parent / (path.name + ".tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _load_npz(path: epath.Path) -> dict:
    with path.open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def assets_dir(config) -> str:
    return config.demo.get("assets_dir", "") or ASSETS_DIR


def _fmt(v: float) -> str:
    return f"{v:g}"


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the samples are stored: uint8 ``[1797, 8, 8, 3]`` (grey level k of 16
    -> round(k·255/16)) and labels ``[1797]``."""
    from cca_jax.data import digits
    x, y = digits.load_digits_images(8, 1)
    u8 = np.rint((x[..., 0] + 1.0) * 0.5 * 255.0).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=-1), y.astype(np.int32)


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    from cca_jax.sampling import job as sample_job
    return sample_job.sample_labels(n, num_classes, "balanced", seed)


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8, zoom: int = 4) -> np.ndarray:
    """Rows = classes 0..9, ``per_class`` samples each, nearest-upscaled by ``zoom``."""
    from cca_jax.sampling import job as sample_job
    rows = []
    H, W, C = images.shape[1:]
    for c in range(10):
        sel = images[labels == c][:per_class]
        if len(sel) < per_class:
            sel = np.concatenate([sel, np.zeros((per_class - len(sel), H, W, C), np.uint8)])
        rows.append(sel)
    grid = sample_job.image_grid(np.concatenate(rows), cols=per_class)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


class _QuietLibraries:
    """Log filter: INFO lines only from cca_jax; Orbax's routine warnings (read-only managers,
    metadata files it does not write for params-only reads) hidden; other warnings and all
    errors kept."""

    def filter(self, record) -> bool:
        import logging as py_logging
        path = record.pathname or ""
        if "cca_jax" in path:
            return True
        if "orbax" in path:
            return record.levelno >= py_logging.ERROR
        return record.levelno >= py_logging.WARNING


def quiet_library_logs() -> None:
    import logging as py_logging
    f = _QuietLibraries()
    for h in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
        if not any(isinstance(x, _QuietLibraries) for x in h.filters):
            h.addFilter(f)


# ================================================================================ the stages

class Demo:
    """State shared by the stages of one demo run (see the module docstring)."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.dc = config.demo
        self.wd = epath.Path(workdir)
        self.wd.mkdir(parents=True, exist_ok=True)
        self.timer = _Timer()
        self.assets = assets_dir(config)
        self._writer = None

    # ---- shared ------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None:
            from clu import metric_writers
            self._writer = metric_writers.create_default_writer(str(self.wd / "tensorboard"))
        return self._writer

    def families(self) -> list[str]:
        fams = [f.strip() for f in str(self.dc.families).split(",") if f.strip()]
        bad = [f for f in fams if f not in FAMILIES]
        if bad or not fams:
            raise ValueError(f"config.demo.families={self.dc.families!r}; use a comma-separated "
                             f"subset of {FAMILIES}.")
        return fams

    def use_assets(self, name: str) -> bool:
        mode = self.dc.reference
        if mode not in ("auto", "assets", "pretrain"):
            raise ValueError(f"config.demo.reference={mode!r}; expected auto | assets | pretrain.")
        path = os.path.join(self.assets, name)
        if mode == "pretrain":
            return False
        if mode == "assets" and not os.path.exists(path):
            raise FileNotFoundError(
                f"config.demo.reference='assets' but {path} is missing; run "
                "`python -m cca_jax.demo.assets` to rebuild the shipped assets, or set "
                "--config.demo.reference=pretrain.")
        return os.path.exists(path)

    # ---- classifier ----------------------------------------------------------------------------
    def classifier(self, real_u8: np.ndarray, labels: np.ndarray):
        from cca_jax.demo import classifier as clf
        from cca_jax import checkpoint
        cfg = clf.ClassifierConfig.from_config(self.dc.classifier)
        d = self.wd / "classifier"
        rep_path = d / "report.json"
        if rep_path.exists():
            params = checkpoint.load_params(str(d / "params"))
            report = json.loads(rep_path.read_text())
        else:
            with self.timer("classifier"):
                params, report = clf.train(real_u8, labels, cfg)
            d.mkdir(parents=True, exist_ok=True)
            checkpoint.export_params(jax.device_get(params), str(d / "params"), overwrite=True)
            _write_json(rep_path, report)
        _print(f"[classifier] held-out accuracy {report['holdout_accuracy']:.3f} "
               f"(train {report['train_accuracy']:.3f}); FID features: {cfg.features}-d")
        return clf.feature_net(params, cfg), report

    # ---- tokenizers ----------------------------------------------------------------------------
    def vqvae(self, fam_cfg, force_train: bool = False) -> tuple[Any, str]:
        """(params, dir) of the demo VQVAE: the shipped asset, else (or with ``force_train``)
        trained into ``<workdir>/tokenizer_var``."""
        from cca_jax import checkpoint
        from cca_jax.demo import tokenizers as T
        from cca_jax.data import digits
        vq_cfg = T.vqvae_config(fam_cfg.tokenizer)
        if not force_train and self.use_assets("vqvae"):
            path = os.path.join(self.assets, "vqvae")
        else:
            path = str(self.wd / "tokenizer_var")
            if not checkpoint.is_params_dir(path):
                tc = self.dc.vqvae_train
                x, _ = digits.load_digits_images(8, vq_cfg.in_channels)
                _print(f"[var] training the VQVAE tokenizer ({tc.steps} steps)")
                with self.timer("var/tokenizer"):
                    params, rep = T.train_vqvae(x, vq_cfg, steps=int(tc.steps),
                                                batch_size=int(tc.batch_size), lr=float(tc.lr),
                                                seed=int(tc.seed))
                checkpoint.export_params(jax.device_get(params), path, overwrite=True,
                                         metadata={"report": rep, "config": fam_cfg.tokenizer.to_dict()})
        from cca_jax.convert import vqvae as vq_conv
        params = vq_conv.load_checkpoint(path, vq_cfg)
        return params, path

    def tokenizer(self, fam: str, fam_cfg):
        from cca_jax.demo import tokenizers as T
        if fam == "llamagen":
            t = fam_cfg.tokenizer
            return T.PixelTokenizer(levels=int(t.levels), image_size=int(t.image_size)), None, ""
        from cca_jax.data import tokenizers as data_tok
        params, path = self.vqvae(fam_cfg)
        vq_cfg = T.vqvae_config(fam_cfg.tokenizer)
        tok = data_tok.vqvae_tokenizer(params, vq_cfg, image_size=vq_cfg.image_size,
                                       batch_size=256, checkpoint=path)
        return tok, params, path

    # ---- data ----------------------------------------------------------------------------------
    def data(self, fam: str, tok, channels: int) -> str:
        from cca_jax.data import digits, writer
        out = self.wd / "data" / fam
        if not (out / writer.METADATA_FILE).exists():
            with self.timer(f"{fam}/data"):
                digits.write_digits_dataset(str(out), tok, size=8, channels=channels,
                                            name=f"digits_{fam}")
        meta = writer.read_metadata(str(out))
        _print(f"[{fam}] token shards: {meta.get('num_images')} images x "
               f"{meta.get('tokens_per_example')} tokens (vocab {meta.get('vocab_size')}) in {out}")
        return str(out)

    # ---- reference -------------------------------------------------------------------------------
    def reference(self, fam: str, fam_cfg, data_dir: str) -> str:
        """Path of the reference params (Orbax dir): the shipped asset or pretrained here."""
        from cca_jax import checkpoint, train
        name = f"{fam}_ref"
        if self.use_assets(name):
            path = os.path.join(self.assets, name)
            _print(f"[{fam}] reference model: shipped {path} (reproduced by "
                   f"configs/demo_pretrain_{fam}.py)")
            return path
        run_dir = self.wd / f"pretrain_{fam}"
        export = run_dir / "params"
        if not checkpoint.is_params_dir(str(export)):
            cfg = self.pretrain_config(fam, data_dir)
            _print(f"[{fam}] pretraining the reference ({cfg.train.num_steps} steps, mle + label "
                   f"dropout {cfg.loss.label_dropout})")
            with self.timer(f"{fam}/pretrain"):
                train.train_and_evaluate(cfg, str(run_dir))
                _, params = checkpoint.load_latest_params(str(run_dir))
                checkpoint.export_params(params, str(export), overwrite=True,
                                         metadata={"config": cfg.to_dict()})
        return str(export)

    def pretrain_config(self, fam: str, data_dir: str):
        fc = self.dc[fam]
        cfg = copy.deepcopy(fc.pretrain)
        with cfg.unlocked():
            cfg.data.path = data_dir
            cfg.mesh = copy.deepcopy(self.config.mesh)
            if fam == "var":
                cfg.init.tokenizer_checkpoint = self._vq_path
        return cfg

    # ---- CCA -----------------------------------------------------------------------------------
    def cca_config(self, fam: str, lam: float, ref_path: str, data_dir: str):
        fc = self.dc[fam]
        cc = fc.cca
        cfg = copy.deepcopy(fc.pretrain)
        with cfg.unlocked():
            cfg.job = "train"
            cfg.mesh = copy.deepcopy(self.config.mesh)
            cfg.init.from_scratch = False
            cfg.init.reference_checkpoint = ref_path
            if fam == "var":
                cfg.init.tokenizer_checkpoint = self._vq_path
            cfg.data.path = data_dir
            cfg.data.shuffle_seed = int(cc.seed)
            cfg.loss.type = "cca"
            cfg.loss.beta = float(cc.beta)
            cfg.loss.lambda_ = float(lam)
            cfg.loss.uncond_ratio = float(cc.uncond_ratio)
            cfg.loss.uncond_zero_form = fam
            cfg.loss.negatives = "global_roll"
            cfg.optim.lr = float(cc.lr)
            cfg.optim.schedule = "constant"
            cfg.optim.weight_decay = float(cc.weight_decay)
            cfg.optim.grad_clip = float(cc.grad_clip)
            cfg.train.global_batch_size = int(cc.batch_size)
            cfg.train.num_steps = int(cc.steps)
            cfg.train.ckpt_every = int(cc.steps)
            cfg.train.keep_checkpoints = 1
            cfg.train.log_every = max(1, int(cc.steps) // 4)
            cfg.train.keep_dropout = True
            cfg.seed = int(cc.seed)
        return cfg

    def cca(self, fam: str, lam: float, ref_path: str, data_dir: str) -> tuple[Any, dict]:
        from cca_jax import checkpoint, train
        cfg = self.cca_config(fam, lam, ref_path, data_dir)
        run_dir = self.wd / f"cca_{fam}_lam{_fmt(lam)}"
        summary_path = run_dir / "cca_summary.json"
        if not summary_path.exists():
            _print(f"[{fam}] CCA fine-tune lambda={_fmt(lam)} beta={cfg.loss.beta} lr={cfg.optim.lr} "
                   f"steps={cfg.train.num_steps} batch={cfg.train.global_batch_size}")
            with self.timer(f"{fam}/cca"):
                out = train.train_and_evaluate(cfg, str(run_dir))
            last = out["history"][-1] if out["history"] else {}
            keep = ("loss", "acc", "reward_margin", "chosen_reward", "rejected_reward", "sft_loss")
            _write_json(summary_path, {"step": out["step"], "lambda": lam,
                                       "final": {k: float(last[k]) for k in keep if k in last}})
        step, params = checkpoint.load_latest_params(str(run_dir))
        summary = json.loads(summary_path.read_text())
        return params, summary

    # ---- sampling + evaluation ---------------------------------------------------------------
    def sample_config(self, fam: str, scale: float):
        fc = self.dc[fam]
        cfg = copy.deepcopy(fc.pretrain)
        with cfg.unlocked():
            for k, v in fc.sample.items():
                cfg.sample[k] = v
            cfg.sample.cfg_scale = float(scale)
        return cfg

    def make_sampler(self, fam: str, params, scale: float, tok, vq_params):
        from cca_jax import families
        from cca_jax.demo import samplers
        cfg = self.sample_config(fam, scale)
        if fam == "llamagen":
            return samplers.llamagen_sampler(families.from_config(cfg), params, tok, cfg.sample)
        return samplers.var_sampler(cfg, params, vq_params)

    def sample_and_eval(self, fam: str, mode: str, sampler, net, reference, ref_labels) -> dict:
        from cca_jax.demo import evaluation, samplers
        from cca_jax.sampling import job as sample_job
        sdir = self.wd / "samples"
        sdir.mkdir(parents=True, exist_ok=True)
        npz = sdir / f"{fam}_{mode}.npz"
        tjson = sdir / f"{fam}_{mode}.timing.json"
        if npz.exists() and tjson.exists():
            z = _load_npz(npz)
            images, labels = z["arr_0"], z["labels"]
            timing = json.loads(tjson.read_text())
        else:
            labels = balanced_labels(int(self.dc.num_samples), 10, int(self.dc.sample_seed))
            with self.timer(f"{fam}/sample"):
                images, timing = samplers.sample_timed(sampler, labels, seed=int(self.dc.sample_seed),
                                                       batch_size=int(self.dc.sample_batch))
            _save_npz(npz, arr_0=images, labels=labels)
            _write_json(tjson, timing)
            grid = class_grid(images, labels)
            sample_job.save_png(grid, sdir / f"{fam}_{mode}.png")
            self.writer.write_images(0, {f"samples/{fam}/{mode}": grid[None]})
        with self.timer("evaluate"):
            m = evaluation.evaluate(net, images, labels, reference, ref_labels)
        m.update(timing)
        return m


# ===================================================================================== run

def _mode_rows(fam: str, fc) -> list[tuple[str, str, float]]:
    rows = [("base", "base", 0.0)]
    rows += [("cfg", f"base_cfg{_fmt(s)}", float(s)) for s in fc.cfg_scales]
    rows += [("cca", f"cca_lam{_fmt(l)}", float(l)) for l in fc.cca.lambdas]
    return rows


def run(config, workdir: str) -> dict:
    """Runs the demo (see the module docstring); returns the results dict (also in
    ``<workdir>/results.json``)."""
    from cca_jax.demo import evaluation, report as report_lib

    t_start = time.perf_counter()
    if config.demo.get("quiet_logs", True):
        quiet_library_logs()
    demo = Demo(config, workdir)
    stages = {s.strip() for s in str(config.demo.stages).split(",")}
    if "tokenizer" in stages and stages != {"all"}:  # configs/demo_tokenizer.py
        _, path = demo.vqvae(config.demo.var.pretrain, force_train=True)
        _print(f"[var] VQVAE tokenizer in {path}")
        return {"tokenizer": path}

    real_u8, real_labels = digits_uint8()
    _print(f"[digits] {len(real_u8)} images 8x8, {len(np.unique(real_labels))} classes "
           f"(scikit-learn load_digits)")
    net, clf_report = demo.classifier(real_u8, real_labels)
    reference = evaluation.reference(net, real_u8, real_labels)
    results = {"classifier": clf_report, "families": {}, "config": config.to_dict()}
    results["data_floor"] = evaluation.data_floor(net, real_u8, real_labels,
                                                  n=int(config.demo.num_samples),
                                                  seed=int(config.demo.sample_seed))

    for fam in demo.families():
        fc = config.demo[fam]
        fam_cfg = fc.pretrain
        tok, vq_params, vq_path = demo.tokenizer(fam, fam_cfg)
        demo._vq_path = vq_path
        channels = int(fam_cfg.tokenizer.get("in_channels", 3)) if fam == "var" else 1
        data_dir = demo.data(fam, tok, channels)
        ref_path = demo.reference(fam, fam_cfg, data_dir)
        from cca_jax import families
        family = families.from_config(fam_cfg)
        ref_params = family.load_params(ref_path)
        rows = []
        for kind, mode, value in _mode_rows(fam, fc):
            if kind == "cca":
                params, summary = demo.cca(fam, value, ref_path, data_dir)
                scale = 1.0 if fam == "llamagen" else 0.0  # guidance-free in each convention
            else:
                params, summary = ref_params, None
                scale = value if kind == "cfg" else (1.0 if fam == "llamagen" else 0.0)
            sampler = demo.make_sampler(fam, params, scale, tok, vq_params)
            m = demo.sample_and_eval(fam, mode, sampler, net, reference, real_labels)
            m.update(kind=kind, mode=mode, value=value, cfg_scale=scale)
            if summary:
                m["cca_train"] = summary["final"]
            rows.append(m)
            _print(f"[{fam}] {mode:>14s}: FID {m['fid']:.3f}  per-class FID {m['cfid']:.3f}  "
                   f"acc {m['accuracy']:.3f}  {1000 * m['sec_per_image']:.3f} ms/img")
        results["families"][fam] = rows

    results["stage_seconds"] = dict(demo.timer.times)
    results["total_seconds"] = time.perf_counter() - t_start
    report_lib.write_all(results, demo.wd, demo.writer)
    demo.writer.flush()
    return results
