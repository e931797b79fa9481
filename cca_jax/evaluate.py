"""The eval job: FID / sFID / IS / precision / recall of a sample batch, to TensorBoard and JSON.

``run(config, workdir)`` (``config.job == "eval"``) reads a sample npz in the OpenAI/ADM format
(``arr_0``: uint8 N×H×W×3; ours or anyone's) — or, when ``config.eval.samples_npz`` is empty,
first runs the sample job of ``cca_jax/sampling/job.py`` — computes features sharded over the
mesh's data axes, compares them with the reference (``config.eval.reference_npz``) and writes
every metric to TensorBoard (clu writer, ``<workdir>/eval``) and ``<workdir>/eval/<name>.json``.

Feature networks are pluggable (:class:`FeatureNet`): the Flax FID-Inception with pytorch-fid's
weights (default), ADM's own TF graph (``config.eval.tf_graph``), or any function of images
(e.g. a small digits classifier: FID in its feature space plus the share of samples classified as
their label, via :func:`compute_metrics`). :func:`fid_for_params` / :func:`make_train_eval_hook`
give the train loop a periodic small-N FID. Metric numerics: ``cca_jax/metrics.py``.

Reference: an ADM reference batch (``arr_0`` images and optionally ``mu``/``sigma``/``mu_s``/
``sigma_s``), any npz of images (``arr_0``), or a directory of image files (ADM's center crop to
``config.eval.reference_image_size``). Features computed for a reference are cached in
``<workdir>/eval_cache`` (or ``config.eval.cache_dir``), keyed by the file and the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import weakref
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from cca_jax import metrics as M
from cca_jax import sharding

ALL_METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------
# Files (local paths or anything tf.io.gfile reads, e.g. gs://)


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def _open(path: str, mode: str = "rb"):
    if _is_remote(path):
        import tensorflow as tf
        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)


def _exists(path: str) -> bool:
    if _is_remote(path):
        import tensorflow as tf
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def _makedirs(path: str) -> None:
    if _is_remote(path):
        import tensorflow as tf
        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def _read_npy_header(f) -> tuple:
    """(shape, fortran_order, dtype) of an ``.npy`` stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"Unsupported .npy format version {version}; save the npz with np.savez.")


class NpzArrayReader:
    """Streams one array of an ``.npz`` in row batches (a 50k×256²×3 batch never sits in memory).

    ``shape``/``dtype`` are read from the ``.npy`` header; compressed and plain npz both work.
    """

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = str(path), key
        with self._member() as f:
            shape, fortran, dtype = _read_npy_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key} is Fortran-ordered or holds objects; write it with "
                             "np.savez from a C-contiguous numeric array.")
        self.shape, self.dtype = tuple(shape), dtype

    @contextlib.contextmanager
    def _member(self):
        if not _exists(self.path):
            raise FileNotFoundError(f"{self.path} does not exist (config.eval.samples_npz / "
                                    "config.eval.reference_npz).")
        with _open(self.path, "rb") as raw, zipfile.ZipFile(raw) as z:
            if f"{self.key}.npy" not in z.namelist():
                raise KeyError(f"{self.path} has no array {self.key!r}; it holds "
                               f"{[n[:-4] for n in z.namelist()]}. ADM-format npz files keep "
                               "the uint8 images in 'arr_0'.")
            with z.open(f"{self.key}.npy") as f:
                yield f

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with self._member() as f:
            _read_npy_header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{self.path}:{self.key} is truncated at row {start}.")
                yield np.frombuffer(buf, self.dtype).reshape((n,) + self.shape[1:])

    def read(self) -> np.ndarray:
        return np.concatenate(list(self.batches(max(len(self), 1))), axis=0) if len(self) else \
            np.zeros(self.shape, self.dtype)


def npz_keys(path: str) -> list[str]:
    with _open(path, "rb") as raw, zipfile.ZipFile(raw) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _check_images(shape: Sequence[int], dtype, where: str) -> None:
    if len(shape) != 4 or shape[-1] not in (1, 3) or np.dtype(dtype) != np.uint8:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3] (ADM format, 0..255), got "
                         f"{np.dtype(dtype)} {tuple(shape)}.")


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's reference preprocessing: halve with a box filter while the short side is ≥ 2×size,
    bicubic-resize the short side to ``image_size``, center-crop ``image_size``²."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.asarray(pil_image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def images_from_directory(path: str, image_size: int, max_images: int = 0) -> np.ndarray:
    """uint8 [N, S, S, 3] from every image file under ``path`` (sorted), ADM-center-cropped."""
    from PIL import Image

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if max_images > 0:
        files = files[:max_images]
    if not files:
        raise FileNotFoundError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) under {path} "
                                "(config.eval.reference_npz).")
    out = np.zeros((len(files), image_size, image_size, 3), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            out[i] = center_crop_arr(im.convert("RGB"), image_size)
    return out


# --------------------------------------------------------------------------------------------
# Feature networks


@dataclasses.dataclass
class FeatureNet:
    """A feature extractor: ``apply(params, images_BHWC uint8) -> {'pool', 'spatial'?, 'logits'?}``.

    ``pool`` [B, F] feeds FID and precision/recall, ``spatial`` [B, S] sFID, ``logits`` [B, K]
    the Inception Score and label accuracy. ``apply`` may also return a bare ``pool`` array.
    ``jittable=False`` marks host functions (the TF graph), called on numpy batches unsharded.
    ``name`` identifies the network in reference caches (include weights and preprocessing).
    """

    apply: Callable[[Any, Any], Any]
    params: Any = None
    name: str = "custom"
    jittable: bool = True
    # jitted extractors by mesh, so repeated calls (reference, samples, training) reuse compiles
    _extractors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


_WRAPPED: "weakref.WeakKeyDictionary[Callable, FeatureNet]" = weakref.WeakKeyDictionary()


def as_feature_net(net_or_fn: FeatureNet | Callable, name: str = "custom") -> FeatureNet:
    """A :class:`FeatureNet`, or a plain ``fn(images) -> features`` wrapped as one (the same
    wrapper for the same function, so its compiled extractor is reused)."""
    if isinstance(net_or_fn, FeatureNet):
        return net_or_fn
    if not callable(net_or_fn):
        raise TypeError(f"Expected a FeatureNet or a function of images, got {type(net_or_fn)}.")
    try:
        return _WRAPPED[net_or_fn]
    except (KeyError, TypeError):
        pass
    net = FeatureNet(apply=lambda params, images: net_or_fn(images), params=None, name=name)
    try:
        _WRAPPED[net_or_fn] = net
    except TypeError:  # not weak-referenceable
        pass
    return net


def _file_id(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return str(path)


def inception_feature_net(weights: str | Any, preprocess: str = "tf1", resolution: int = 299
                          ) -> FeatureNet:
    """The Flax FID-Inception; ``weights`` is the pytorch-fid ``.pth`` path or a params tree."""
    from cca_jax.models import inception as inc

    model = inc.FIDInceptionV3(resize_to=resolution, preprocess=preprocess)
    if isinstance(weights, (str, os.PathLike)):
        from cca_jax.convert.inception import load_checkpoint
        params, wid = load_checkpoint(weights), _file_id(str(weights))
    else:
        params = weights
        leaves = jax.tree_util.tree_leaves(params)
        wid = "params:" + hashlib.sha1(b"".join(
            np.asarray(x[..., :2] if np.ndim(x) else x).tobytes() for x in leaves)).hexdigest()
    return FeatureNet(apply=inc.feature_apply(model), params=params,
                      name=f"fid_inception:{wid}:{preprocess}:{resolution}")


def tf_graph_feature_net(graph_path: str) -> FeatureNet:
    """ADM's exact feature path through its frozen TF graph (``classify_image_graph_def.pb``).

    Feeds float32 [0, 255] images to ``ExpandDims:0`` and fetches ``pool_3:0`` (→ [B, 2048]) and
    ``mixed_6/conv:0``[..., :7] (→ flattened); logits = pool3 · W with W the second input of
    ``softmax/logits/MatMul`` (no bias), as the ADM evaluator does. Runs on the host (TF).
    """
    import tensorflow as tf

    if not _exists(graph_path):
        raise FileNotFoundError(f"config.eval.tf_graph={graph_path!r} does not exist; give the "
                                "path of ADM's classify_image_graph_def.pb (never downloaded).")
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
        graph_def = tf.compat.v1.GraphDef()
        with _open(graph_path, "rb") as f:
            graph_def.ParseFromString(f.read())
        pool3, spatial = tf.compat.v1.import_graph_def(
            graph_def, input_map={"ExpandDims:0": images},
            return_elements=["pool_3:0", "mixed_6/conv:0"], name="adm")
        weight = graph.get_operation_by_name("adm/softmax/logits/MatMul").inputs[1]
    sess = tf.compat.v1.Session(graph=graph)
    w = np.asarray(sess.run(weight, {images: np.zeros((1, 299, 299, 3), np.float32)}), np.float32)

    def apply(params, images_BHWC):
        x = np.asarray(images_BHWC, np.float32)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        p, s = sess.run([pool3, spatial], {images: x})
        p = p.reshape(len(x), -1)
        s = s[..., :7].reshape(len(x), -1)
        return {"pool": p, "spatial": s, "logits": p @ w}

    return FeatureNet(apply=apply, params=None, name=f"adm_tf_graph:{_file_id(graph_path)}",
                      jittable=False)


def feature_net_from_config(config) -> FeatureNet:
    ev = config.eval
    if ev.get("tf_graph", ""):
        return tf_graph_feature_net(ev.tf_graph)
    return inception_feature_net(ev.inception_weights, ev.get("inception_preprocess", "tf1"),
                                 ev.get("inception_resolution", 299))


# --------------------------------------------------------------------------------------------
# Sharded feature extraction


def _all_processes(flag: bool) -> bool:
    """True iff ``flag`` holds on every process (feature extraction is collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def _to_host(x) -> np.ndarray:
    """numpy copy of a (possibly multi-host sharded) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _as_dict(out) -> dict:
    return dict(out) if isinstance(out, Mapping) else {"pool": out}


def _data_parallel(mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def _put(x: np.ndarray, s) -> jax.Array:
    # works on multi-host meshes: every process holds the whole (global) host array
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


class _Extractor:
    """``net.apply`` jitted with replicated params and the batch split over (data, fsdp);
    compiled once per batch shape."""

    def __init__(self, net: FeatureNet, mesh=None):
        self.net, self.mesh, self.data_parallel = net, mesh, 1
        if net.jittable:
            self.data_parallel = _data_parallel(mesh)
            rep = sharding.replicated(mesh)
            self.batch_sharding = sharding.batch_sharding(mesh, 4)
            self.params = jax.tree_util.tree_map(lambda x: _put(np.asarray(x), rep), net.params)
            self.fn = jax.jit(lambda p, x: _as_dict(net.apply(p, x)),
                              in_shardings=(rep, self.batch_sharding), out_shardings=rep)

    def __call__(self, batch: np.ndarray, global_batch: int) -> dict[str, np.ndarray]:
        n = len(batch)
        if not self.net.jittable:
            out = _as_dict(self.net.apply(self.net.params, batch))
            return {k: np.asarray(v) for k, v in out.items()}
        if n < global_batch:  # static shapes: pad, then drop the padded rows
            pad = np.zeros((global_batch - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        with sharding.use_mesh(self.mesh):
            out = self.fn(self.params, _put(np.ascontiguousarray(batch), self.batch_sharding))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    buf, count = [], 0
    for b in batches:
        buf.append(np.asarray(b))
        count += len(b)
        while count >= size:
            cat = np.concatenate(buf)
            yield cat[:size]
            buf, count = [cat[size:]], count - size
    if count:
        yield np.concatenate(buf)


def extract_features(net: FeatureNet | Callable, images, *, batch_size: int = 64, mesh=None,
                     progress: bool = True, desc: str = "features") -> dict[str, np.ndarray]:
    """Features of ``images`` (uint8 [N, H, W, C] array, :class:`NpzArrayReader`, or an iterable
    of batches) → ``{'pool': [N, F], 'spatial'?: …, 'logits'?: …}`` (host float32 arrays).

    ``batch_size`` is per device: a jittable net processes ``batch_size × data × fsdp`` images per
    call, sharded over the mesh's data axes (the last call is padded).
    """
    from tqdm.auto import tqdm

    net = as_feature_net(net)
    mesh = mesh if mesh is not None or not net.jittable else sharding.make_mesh()
    ex = net._extractors.get(mesh)  # noqa: SLF001 (Mesh compares by devices and axis names)
    if ex is None:
        ex = net._extractors[mesh] = _Extractor(net, mesh)  # noqa: SLF001
    if isinstance(images, NpzArrayReader) or hasattr(images, "shape"):
        total = len(images)
    else:
        total = None
    gb = batch_size * ex.data_parallel
    if total:  # a small set needs no full-size (padded) batch
        gb = min(gb, -(-total // ex.data_parallel) * ex.data_parallel)
    if isinstance(images, NpzArrayReader):
        source = images.batches(gb)
    elif total is not None:
        images = np.asarray(images)
        source = (images[i: i + gb] for i in range(0, total, gb))
    else:
        source = images
    outs: dict[str, list] = {}
    t0 = time.time()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or jax.process_index() > 0,
              dynamic_ncols=True) as bar:
        for batch in _rebatch(source, gb):
            for k, v in ex(batch, gb).items():
                outs.setdefault(k, []).append(np.asarray(v, np.float32))
            bar.update(len(batch))
    if not outs:
        raise ValueError(f"No images to compute {desc} for.")
    feats = {k: np.concatenate(v) for k, v in outs.items()}
    logging.info("%s: %d images in %.1fs", desc, len(feats["pool"]), time.time() - t0)
    return feats


# --------------------------------------------------------------------------------------------
# Reference


@dataclasses.dataclass
class Reference:
    """Reference side of the metrics: FID stats, sFID stats and pool features (for P/R)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    labels: np.ndarray | None = None
    source: str = ""

    def as_dict(self) -> dict[str, np.ndarray]:
        d = {"mu": self.mu, "sigma": self.sigma, "pool": self.pool}
        if self.mu_s is not None:
            d.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        return d

    @classmethod
    def from_features(cls, feats: Mapping[str, np.ndarray], labels=None, source="") -> "Reference":
        pool = M.FIDStatistics.from_features(feats["pool"])
        spatial = None
        if feats.get("spatial") is not None:
            spatial = M.FIDStatistics.from_features(feats["spatial"])
        return cls(pool.mu, pool.sigma, spatial.mu if spatial else None,
                   spatial.sigma if spatial else None, np.asarray(feats["pool"], np.float32),
                   labels, source)

    def save(self, path: str) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items()
                  if isinstance(v, np.ndarray)}
        tmp = path + ".tmp.npz"
        with _open(tmp, "wb") as f:
            np.savez(f, **arrays)
        if _is_remote(path):
            import tensorflow as tf
            tf.io.gfile.rename(tmp, path, overwrite=True)
        else:
            os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Reference":
        with _open(path, "rb") as f, np.load(f) as z:
            return cls(**{k: z[k] for k in z.files}, source=path)


def _label_key(keys: Sequence[str], wanted: str = "") -> str | None:
    if wanted:
        if wanted not in keys:
            raise KeyError(f"config.eval.labels_key={wanted!r} is not in the npz (keys {keys}).")
        return wanted
    return next((k for k in ("labels", "arr_1") if k in keys), None)


def _is_adm_network(name: str) -> bool:
    """Whether a :class:`FeatureNet` is the one ADM's reference statistics were made with: the TF
    graph itself, or its port with the TF1 front end at 299 px."""
    return name.startswith("adm_tf_graph:") or (name.startswith("fid_inception:")
                                                and name.endswith(":tf1:299"))


def load_reference(path: str, net: FeatureNet, *, cache_dir: str = "", batch_size: int = 64,
                   mesh=None, stats: str = "file", image_size: int = 256, max_images: int = 0,
                   progress: bool = True) -> Reference:
    """Reference statistics and features for ``path`` (ADM reference batch npz, npz of images,
    or a directory of image files), cached under ``cache_dir`` by file and network.

    stats ``"file"``: an npz's own ``mu``/``sigma`` (``mu_s``/``sigma_s``) replace the ones
    computed from ``arr_0`` (ADM semantics; they were made by the TF graph). ``"recompute"``:
    always from ``arr_0`` through ``net``. Precision/recall always use ``arr_0``'s features.
    """
    if stats not in ("file", "recompute"):
        raise ValueError(f"config.eval.reference_stats={stats!r}; expected 'file' or 'recompute'.")
    if not path:
        raise ValueError("config.eval.reference_npz is empty: give an ADM reference batch "
                         "(VIRTUAL_imagenet256_labeled.npz), an npz of uint8 images (arr_0) or a "
                         "directory of images.")
    key = hashlib.sha1(f"{_file_id(path)}|{net.name}|{stats}|{image_size}|{max_images}".encode()
                       ).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"reference_{key}.npz") if cache_dir else ""
    if cache and _all_processes(_exists(cache)):  # all hosts must take the same (collective) path
        logging.info("reference features from cache %s", cache)
        return Reference.load(cache)

    labels, file_stats = None, {}
    if not _is_remote(path) and os.path.isdir(path):
        images: Any = images_from_directory(path, image_size, max_images)
    else:
        keys = npz_keys(path)
        images = NpzArrayReader(path, "arr_0")
        _check_images(images.shape, images.dtype, f"{path}:arr_0")
        lk = _label_key(keys)
        if lk:
            labels = NpzArrayReader(path, lk).read()
        if stats == "file":
            file_stats = {k: NpzArrayReader(path, k).read() for k in ("mu", "sigma", "mu_s", "sigma_s")
                          if k in keys}
    feats = extract_features(net, images, batch_size=batch_size, mesh=mesh, progress=progress,
                             desc="reference features")
    ref = Reference.from_features(feats, labels, path)
    if "mu" in file_stats and not _is_adm_network(net.name):
        logging.warning(
            "%s holds mu/sigma made by ADM's TF Inception graph, but the features come from %s: "
            "FID mixes two networks' statistics. Set config.eval.reference_stats='recompute' to "
            "compute the reference statistics with the same network.", path, net.name)
    if "mu" in file_stats:
        ref.mu, ref.sigma = file_stats["mu"], file_stats["sigma"]
        if "mu_s" in file_stats:
            ref.mu_s, ref.sigma_s = file_stats["mu_s"], file_stats["sigma_s"]
    if cache and jax.process_index() == 0:
        _makedirs(cache_dir)
        ref.save(cache)
    return ref


# --------------------------------------------------------------------------------------------
# Metrics from images


def compute_metrics(features_fn: FeatureNet | Callable, samples, reference: Reference | Any, *,
                    logits_fn: Callable | None = None, labels: np.ndarray | None = None,
                    metrics: Sequence[str] | None = None, batch_size: int = 64, mesh=None,
                    split_size: int = M.IS_SPLIT_SIZE, pr_k: int = M.PR_K,
                    pr_batch_size: int = M.PR_BATCH_SIZE, fid_method: str = "sqrtm",
                    progress: bool = False) -> dict[str, float]:
    """Metrics of ``samples`` (uint8 images, :class:`NpzArrayReader` or precomputed feature
    dict) against ``reference`` (:class:`Reference`, or uint8 reference images).

    features_fn: :class:`FeatureNet` or ``fn(images) -> pool features`` (or a dict with
      ``pool``/``spatial``/``logits``).
    logits_fn: ``fn(pool features) -> logits`` when the network does not return ``logits``
      (e.g. a classifier head) — enables the Inception Score and, with ``labels``, ``accuracy``
      (share of samples classified as their label).
    metrics: subset of :data:`ALL_METRICS`; None = all the inputs allow.
    fid_method: ``"sqrtm"`` (ADM's numerics) or ``"eigh"`` (fast; see ``metrics.frechet_distance``).
    """
    net = as_feature_net(features_fn)
    kw = dict(batch_size=batch_size, mesh=mesh, progress=progress)
    feats = dict(samples) if isinstance(samples, Mapping) else extract_features(
        net, samples, desc="sample features", **kw)
    if not isinstance(reference, Reference):
        reference = Reference.from_features(
            extract_features(net, reference, desc="reference features", **kw))
    if feats.get("logits") is None and logits_fn is not None:
        feats["logits"] = np.asarray(logits_fn(feats["pool"]), np.float32)
    if metrics is not None:
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"Unknown metrics {sorted(unknown)} (config.eval.metrics); choose "
                             f"from {ALL_METRICS}.")
    return M.compute_all(feats, reference.as_dict(), labels=labels, split_size=split_size,
                         pr_k=pr_k, pr_batch_size=pr_batch_size, metrics=metrics,
                         fid_method=fid_method)


# --------------------------------------------------------------------------------------------
# In-training evaluation


def fid_for_params(params, sample_fn: Callable, features_fn: FeatureNet | Callable,
                   reference: Reference, *, num_samples: int, rng: jax.Array,
                   metrics: Sequence[str] = ("fid",), batch_size: int = 64, mesh=None,
                   logits_fn: Callable | None = None, fid_method: str = "eigh",
                   progress: bool = False) -> dict[str, float]:
    """Small-N metrics of a model: calls ``sample_fn(params, key) -> uint8 images [B, H, W, C]``
    (or ``(images, labels)``) with fresh keys until ``num_samples`` images exist, then
    :func:`compute_metrics`. Generic over the sampler and the feature network. FID defaults to
    the ``eigh`` method: with N < 2048 the covariance is singular and ADM's sqrtm takes minutes."""
    images, labels, i = [], [], 0
    while sum(len(x) for x in images) < num_samples:
        out = sample_fn(params, jax.random.fold_in(rng, i))
        imgs, labs = out if isinstance(out, tuple) else (out, None)
        images.append(_to_host(imgs))
        if labs is not None:
            labels.append(_to_host(labs))
        i += 1
    images_np = np.concatenate(images)[:num_samples]
    labels_np = np.concatenate(labels)[:num_samples] if labels else None
    return compute_metrics(features_fn, images_np, reference, logits_fn=logits_fn,
                           labels=labels_np if "accuracy" in metrics else None, metrics=metrics,
                           batch_size=batch_size, mesh=mesh, fid_method=fid_method,
                           progress=progress)


def make_train_eval_hook(config, workdir: str, sample_fn: Callable, *, mesh=None,
                         features_fn: FeatureNet | Callable | None = None):
    """``hook(params, step) -> {'eval/<metric>': value}`` for the train loop (every
    ``config.train.eval_every`` steps). The feature network and the reference are built on first
    use and reused; ``sample_fn`` as in :func:`fid_for_params`."""
    ev, state = config.eval, {}

    def hook(params, step: int) -> dict[str, float]:
        if "net" not in state:
            state["net"] = as_feature_net(features_fn) if features_fn is not None else \
                feature_net_from_config(config)
            state["ref"] = load_reference(
                ev.reference_npz, state["net"], cache_dir=_cache_dir(config, workdir),
                batch_size=ev.batch_size, mesh=mesh, stats=ev.get("reference_stats", "file"),
                image_size=ev.get("reference_image_size", 256), progress=False)
        out = fid_for_params(params, sample_fn, state["net"], state["ref"],
                             num_samples=ev.get("train_num_samples", 1000),
                             rng=jax.random.fold_in(jax.random.key(config.seed), step),
                             metrics=_metric_list(ev.get("train_metrics", "fid")),
                             batch_size=ev.batch_size, mesh=mesh)
        return {f"eval/{k}": v for k, v in out.items()}

    return hook


# --------------------------------------------------------------------------------------------
# The job


def _metric_list(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = set(names) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"config.eval.metrics has unknown names {sorted(unknown)}; choose from "
                         f"{ALL_METRICS}.")
    return names


def _cache_dir(config, workdir: str) -> str:
    return config.eval.get("cache_dir", "") or os.path.join(workdir, "eval_cache")


def _samples_from_checkpoint(config, workdir: str) -> str:
    """Runs the sample job and returns the npz it wrote."""
    try:
        from cca_jax.sampling import job
    except ImportError as e:
        raise RuntimeError(
            "config.eval.samples_npz is empty, so the eval job would sample from the checkpoint "
            f"first, but the sample job cannot be imported ({e}). Run the sample job "
            "(config.job='sample') and set config.eval.samples_npz to its npz.") from e
    fn = getattr(job, "sample_to_npz", None) or getattr(job, "run", None)
    if fn is None:
        raise RuntimeError("cca_jax/sampling/job.py defines neither sample_to_npz(config, "
                           "workdir) nor run(config, workdir); set config.eval.samples_npz.")
    path = fn(config, workdir)
    if isinstance(path, Mapping):
        path = path.get("npz") or path.get("path")
    if not isinstance(path, (str, os.PathLike)) or not _exists(str(path)):
        raise RuntimeError(f"The sample job returned {path!r}, not the path of the npz it wrote; "
                           "set config.eval.samples_npz to that file.")
    return str(path)


def _tensorboard_step(step: int, samples_path: str) -> int:
    """``config.eval.step``, or for -1 the training step of the sampled checkpoint that the sample
    job stored in the npz (``train_step``; 0 for samples of another origin)."""
    if step >= 0:
        return step
    from cca_jax.sampling.job import TRAIN_STEP_KEY
    if TRAIN_STEP_KEY not in npz_keys(samples_path):
        return 0
    with _open(samples_path, "rb") as raw, np.load(raw) as z:
        return int(z[TRAIN_STEP_KEY])


def _write_json(path: str, obj: dict) -> None:
    _makedirs(os.path.dirname(path))
    with _open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))


def run(config, workdir: str) -> dict[str, float]:
    """``config.job == "eval"``: metrics of a sample npz (or of fresh samples) → TensorBoard + JSON.

    Returns the metrics; every process computes them, process 0 writes.
    """
    from clu import metric_writers

    ev = config.eval
    names = _metric_list(ev.get("metrics", ",".join(ALL_METRICS[:-1])))
    # check what the metrics need before a possibly hours-long sample job
    if not ev.reference_npz:
        raise ValueError("config.eval.reference_npz is empty: give an ADM reference batch "
                         "(VIRTUAL_imagenet256_labeled.npz), an npz of uint8 images (arr_0) or a "
                         "directory of images.")
    if not _exists(ev.reference_npz):
        raise FileNotFoundError(f"config.eval.reference_npz={ev.reference_npz!r} does not exist.")
    mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
    net = feature_net_from_config(config)
    samples_path = ev.samples_npz or _samples_from_checkpoint(config, workdir)
    reader = NpzArrayReader(samples_path, "arr_0")
    _check_images(reader.shape, reader.dtype, f"{samples_path}:arr_0")
    logging.info("eval: %d samples %s from %s", len(reader), reader.shape[1:], samples_path)

    reference = load_reference(ev.reference_npz, net, cache_dir=_cache_dir(config, workdir),
                               batch_size=ev.batch_size, mesh=mesh,
                               stats=ev.get("reference_stats", "file"),
                               image_size=ev.get("reference_image_size", 256))
    labels = None
    if "accuracy" in names:
        lk = _label_key(npz_keys(samples_path), ev.get("labels_key", ""))
        if lk is None:
            raise KeyError(f"metric 'accuracy' needs labels in {samples_path} ('labels' or "
                           "'arr_1', or config.eval.labels_key).")
        labels = NpzArrayReader(samples_path, lk).read()
    results = compute_metrics(net, reader, reference, labels=labels, metrics=names,
                              batch_size=ev.batch_size, mesh=mesh,
                              split_size=ev.get("is_split_size", M.IS_SPLIT_SIZE),
                              pr_k=ev.get("pr_k", M.PR_K),
                              pr_batch_size=ev.get("pr_batch_size", M.PR_BATCH_SIZE),
                              fid_method=ev.get("fid_method", "sqrtm"), progress=True)
    for k, v in results.items():
        logging.info("eval %s = %.6g", k, v)
    if jax.process_index() == 0:
        step = _tensorboard_step(int(ev.get("step", -1)), samples_path)
        writer = metric_writers.create_default_writer(workdir, collection="eval")
        writer.write_scalars(step, results)
        writer.flush()
        writer.close()
        name = ev.get("output_name", "") or os.path.splitext(os.path.basename(samples_path))[0]
        _write_json(os.path.join(workdir, "eval", f"{name}.json"), {
            "metrics": results, "samples_npz": samples_path, "reference": ev.reference_npz,
            "feature_net": net.name, "step": step, "num_reference": int(len(reference.pool))
            if reference.pool is not None else 0})
    return results
