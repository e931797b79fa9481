"""Shard writer: images → views → tokenizer → ArrayRecord shards + dataset metadata.

Output directory layout (a TFDS dataset directory: ``tfds.builder_from_directory(out_dir)``
reads it with ``as_data_source``):

* ``{name}-train.array_record-{k:05d}-of-{n:05d}``: shard ``k`` holds images
  ``[k·images_per_shard, (k+1)·images_per_shard)`` of the source order, one record per
  ``(image, view)``, image-major and view-minor, so the global record id of image ``i`` view
  ``v`` is ``i·num_views + v`` (records: ``cca_jax/data/records.py``). Written with
  ``group_size:1,uncompressed`` (fast random access; token ids do not compress).
* ``dataset_info.json``, ``features.json``: TFDS metadata.
* ``token_dataset.json`` (:data:`METADATA_FILE`): what the reader checks against the model
  config — tokenizer name/family/checksum, resolution, vocab size, tokens per example,
  patch_nums, token dtype, classes, images, views, shard list. Written last; its presence means the
  dataset is complete.
* ``tokenize_job.json``: the job's identity (source, views, tokenizer checksum, sharding). A rerun
  with a different identity into the same directory is refused instead of mixing datasets.

Resumable: a shard is written to ``<file>.tmp-<process>`` and renamed when complete; a rerun skips
every shard whose final file exists with the expected record count. Shard ``k`` belongs to
process ``k mod process_count``; each process encodes its images on its own devices
(``tokenizers.JaxTokenizer``), so a job restarted with a different number of hosts still only
writes the missing shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from absl import logging

from cca_jax.data import records
from cca_jax.data.tokenizers import tokenizer_info

METADATA_FILE = "token_dataset.json"
JOB_FILE = "tokenize_job.json"
FORMAT = "cca_jax.token_dataset"
FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1,uncompressed"
SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    index: int
    first_image: int
    num_images: int
    filename: str


def shard_filename(name: str, index: int, count: int, split: str = SPLIT) -> str:
    return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def plan_shards(num_images: int, images_per_shard: int, name: str) -> list[ShardPlan]:
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard} "
                         "(config.tokenize.images_per_shard).")
    n = max(1, -(-num_images // images_per_shard))
    return [ShardPlan(k, k * images_per_shard, min(images_per_shard, num_images - k * images_per_shard),
                      shard_filename(name, k, n)) for k in range(n)]


def _is_remote(path: str) -> bool:
    return "://" in path


def _exists(path: str) -> bool:
    if _is_remote(path):
        from etils import epath
        return epath.Path(path).exists()
    return os.path.exists(path)


def _read_text(path: str) -> str:
    from etils import epath
    return epath.Path(path).read_text()


def _write_text_atomic(path: str, text: str) -> None:
    from etils import epath
    if _is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def count_records(path: str) -> int | None:
    """Number of records in an ArrayRecord file, or None if it is missing or unreadable."""
    from array_record.python import array_record_module as arm
    if not _exists(path):
        return None
    try:
        r = arm.ArrayRecordReader(path, "readahead_buffer_size:0")
        n = r.num_records()
        r.close()
        return int(n)
    except Exception:  # noqa: BLE001 - truncated / corrupt footer
        return None


class _ShardFile:
    """An ArrayRecord file written under a temporary name and renamed when complete."""

    def __init__(self, final_path: str, expected: int, tag: str):
        from array_record.python import array_record_module as arm
        self.final_path, self.expected, self.count = final_path, expected, 0
        if _is_remote(final_path):
            self._tmpdir = tempfile.mkdtemp(prefix="cca_shard_")
            self.tmp_path = os.path.join(self._tmpdir, os.path.basename(final_path))
        else:
            self._tmpdir = None
            self.tmp_path = f"{final_path}.tmp-{tag}"
        self._w = arm.ArrayRecordWriter(self.tmp_path, WRITER_OPTIONS)

    def write(self, rec: bytes) -> None:
        self._w.write(rec)
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == self.expected

    def commit(self) -> None:
        self._w.close()
        if self._tmpdir:
            from etils import epath
            epath.Path(self.tmp_path).copy(self.final_path, overwrite=True)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        else:
            os.replace(self.tmp_path, self.final_path)


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _ordered_map(fn: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, at most ``window`` items ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        q: collections.deque = collections.deque()
        for it in items:
            q.append(ex.submit(fn, it))
            if len(q) >= window:
                yield q.popleft().result()
        while q:
            yield q.popleft().result()


def default_views_input(raw: Any):
    """Opens paths/bytes as RGB PIL images; arrays pass through."""
    if isinstance(raw, np.ndarray):
        return raw
    from cca_jax.data.preprocess import load_rgb
    return load_rgb(raw)


def job_identity(*, name, source, views, tokenizer, images_per_shard) -> dict:
    info = tokenizer_info(tokenizer)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
            "source": source.describe(), "preprocessing": views.describe(),
            "num_views": int(views.num_views), "tokenizer": info,
            "num_images": int(source.num_images), "num_classes": int(source.num_classes),
            "images_per_shard": int(images_per_shard)}


def _resume_key(ident: dict) -> dict:
    """What must match for a rerun to continue an existing directory (paths may move)."""
    ident = json.loads(json.dumps(ident))
    tok = ident["tokenizer"]
    return {"name": ident["name"], "preprocessing": ident["preprocessing"],
            "num_views": ident["num_views"], "num_images": ident["num_images"],
            "num_classes": ident["num_classes"], "images_per_shard": ident["images_per_shard"],
            "tokenizer": [tok["name"], tok["checksum"], tok["vocab_size"], tok["patch_nums"]],
            "source_kind": ident["source"].get("kind")}


def write_dataset(out_dir: str, *, source, views, tokenizer, name: str = "tokens",
                  images_per_shard: int = 1024, num_workers: int = 8,
                  process_index: int | None = None, process_count: int | None = None,
                  progress: bool = True, resolution: int | None = None,
                  extra_metadata: dict | None = None) -> dict | None:
    """Tokenizes ``source`` into ``out_dir`` (resumable); returns the dataset metadata (None on
    a process other than 0 when ``process_index`` is simulated and process 0 has not run yet).

    source: ``sources.ImageFolderSource`` / ``TfdsSource`` / ``ArraySource`` (``num_images``,
      ``num_classes``, ``read_range``, ``describe``).
    views: ``preprocess`` views object: ``(image, index) -> [V, S, S, 3]`` float32,
      ``num_views``, ``describe()``.
    tokenizer: anything with ``encode(images) -> tokens [B, L]`` and ``vocab_size``
      (``tokenizers.ImageTokenizer``); a ``JaxTokenizer`` is driven asynchronously in batches of
      its ``batch_size`` rows.
    """
    import jax
    p = jax.process_index() if process_index is None else int(process_index)
    P = jax.process_count() if process_count is None else int(process_count)
    if not _is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    ident = job_identity(name=name, source=source, views=views, tokenizer=tokenizer,
                         images_per_shard=images_per_shard)
    job_path = os.path.join(out_dir, JOB_FILE)
    if _exists(job_path):
        old, new = _resume_key(json.loads(_read_text(job_path))), _resume_key(ident)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{out_dir} holds shards of a different tokenize job (fields {diff} "
                             f"differ, see {job_path}); write to an empty directory "
                             "(config.data.path) or delete the old shards.")
    elif p == 0:
        _write_text_atomic(job_path, json.dumps(ident, indent=1))

    plan = plan_shards(source.num_images, images_per_shard, name)
    V = int(views.num_views)
    if not _is_remote(out_dir):  # leftovers of this process's interrupted shards
        for f in os.listdir(out_dir):
            if f.endswith(f".tmp-{p}") and ".array_record-" in f:
                os.remove(os.path.join(out_dir, f))
    mine = [s for s in plan if s.index % P == p]
    todo = [s for s in mine
            if count_records(os.path.join(out_dir, s.filename)) != s.num_images * V]
    logging.info("tokenize: process %d/%d owns %d of %d shards, %d to write", p, P, len(mine),
                 len(plan), len(todo))
    _encode_shards(out_dir, todo, source=source, views=views, tokenizer=tokenizer,
                   num_workers=num_workers, progress=progress, tag=str(p))
    _barrier("cca_tokenize_shards_written")
    if p == 0:
        return_meta = finalize(out_dir, plan, ident, resolution=resolution, extra=extra_metadata)
    _barrier("cca_tokenize_metadata_written")
    meta_path = os.path.join(out_dir, METADATA_FILE)
    if p != 0 and not _exists(meta_path):
        return None  # simulated process indices in one process: process 0 finalizes later
    return return_meta if p == 0 else json.loads(_read_text(meta_path))


def _encode_shards(out_dir, shards: list[ShardPlan], *, source, views, tokenizer, num_workers,
                   progress, tag) -> None:
    if not shards:
        return
    from tqdm import tqdm
    V, vocab = int(views.num_views), int(tokenizer.vocab_size)
    dtype = records.token_dtype(vocab)
    batch = int(getattr(tokenizer, "batch_size", 0) or max(V, 64))
    is_async = callable(getattr(tokenizer, "encode_async", None))

    def items():
        for s in shards:
            for i, raw, label, where in source.read_range(s.first_image, s.first_image + s.num_images):
                yield s, i, raw, label, where

    def prep(item):
        s, i, raw, label, where = item
        try:
            arr = np.asarray(views(default_views_input(raw), i), np.float32)
        except Exception as e:  # noqa: BLE001 - name the image, keep the cause
            raise ValueError(f"Cannot preprocess image {i} ({where}): {e}") from e
        if arr.ndim != 4 or arr.shape[0] != V:
            raise ValueError(f"Views of image {i} ({where}) have shape {arr.shape}; expected "
                             f"[{V}, H, W, C].")
        if not 0 <= label < source.num_classes:
            raise ValueError(f"Image {i} ({where}) has label {label} outside [0, {source.num_classes}).")
        return s, i, label, where, arr

    writers: dict[int, _ShardFile] = {}
    pending: collections.deque = collections.deque()
    meta_rows: list = []  # (shard, image, view, label, where) per buffered row
    chunks: list[np.ndarray] = []
    n_buf = 0
    bar = tqdm(total=sum(s.num_images for s in shards), unit="img", disable=not progress,
               desc=f"tokenize[{tag}]", smoothing=0.05)
    t0 = time.time()

    def emit(tokens: np.ndarray, rows: list) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] < len(rows):
            raise ValueError(f"Tokenizer returned shape {tokens.shape} for {len(rows)} images; "
                             "expected [B, L].")
        for t, (s, i, v, label, where) in zip(tokens, rows):
            if t.min() < 0 or t.max() >= vocab:
                raise ValueError(f"Tokenizer produced id {int(t.max() if t.max() >= vocab else t.min())} "
                                 f"outside [0, {vocab}) for image {i} ({where}) view {v}.")
            w = writers.get(s.index)
            if w is None:
                w = writers[s.index] = _ShardFile(os.path.join(out_dir, s.filename), s.num_images * V, tag)
            w.write(records.encode_example(t, label, v, i, dtype))
            if v == V - 1:
                bar.update(1)
            if w.full:
                w.commit()
                del writers[s.index]

    def submit(x: np.ndarray, rows: list) -> None:
        if is_async and x.shape[0] == batch:
            pending.append((tokenizer.encode_async(x), rows))
            while len(pending) > 1:  # keep one batch in flight while the host prepares the next
                fut, r = pending.popleft()
                emit(np.asarray(fut), r)
        else:
            while pending:
                fut, r = pending.popleft()
                emit(np.asarray(fut), r)
            emit(tokenizer.encode(x), rows)

    window = max(2 * num_workers, -(-2 * batch // V))
    for s, i, label, where, arr in _ordered_map(prep, items(), num_workers, window):
        chunks.append(arr)
        meta_rows.extend((s, i, v, label, where) for v in range(V))
        n_buf += V
        while n_buf >= batch:
            x = np.concatenate(chunks)
            submit(x[:batch], meta_rows[:batch])
            rest = x[batch:]
            chunks, meta_rows, n_buf = ([rest] if len(rest) else []), meta_rows[batch:], len(rest)
    if n_buf:
        x = np.concatenate(chunks)
        if is_async:  # pad to the compiled batch
            x = np.concatenate([x, np.zeros((batch - n_buf, *x.shape[1:]), x.dtype)])
        submit(x, meta_rows)
    while pending:
        fut, r = pending.popleft()
        emit(np.asarray(fut), r)
    bar.close()
    if writers:
        raise RuntimeError(f"Shards {sorted(writers)} did not receive all their records.")
    n_img = sum(s.num_images for s in shards)
    logging.info("tokenize[%s]: %d images in %.1fs (%.1f img/s)", tag, n_img, time.time() - t0,
                 n_img / max(time.time() - t0, 1e-9))


def finalize(out_dir: str, plan: list[ShardPlan], ident: dict, *, resolution: int | None = None,
             extra: dict | None = None) -> dict:
    """Checks every shard and writes ``token_dataset.json`` and the TFDS metadata."""
    V = ident["num_views"]
    bad = []
    for s in plan:
        n = count_records(os.path.join(out_dir, s.filename))
        if n != s.num_images * V:
            bad.append(f"{s.filename} ({'missing/unreadable' if n is None else f'{n} records'}, "
                       f"expected {s.num_images * V})")
    if bad:
        raise RuntimeError(f"{len(bad)} shard(s) of {out_dir} are incomplete: {bad[:5]}; rerun the "
                           "tokenize job (finished shards are skipped).")
    from array_record.python import array_record_module as arm
    tok = ident["tokenizer"]
    dtype = records.token_dtype(tok["vocab_size"])
    r = arm.ArrayRecordReader(os.path.join(out_dir, plan[0].filename), "readahead_buffer_size:0")
    first = records.decode_example(r.read([0])[0], dtype)
    r.close()
    L = int(first["tokens"].shape[0])
    pn = tok.get("patch_nums")
    if pn is not None and sum(int(x) ** 2 for x in pn) != L:
        raise ValueError(f"Tokenizer patch_nums {pn} give {sum(int(x) ** 2 for x in pn)} tokens but "
                         f"the records hold {L}.")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": ident["name"], "split": SPLIT,
        "tokenizer": {k: tok[k] for k in ("name", "family", "checksum", "config")},
        "resolution": int(resolution or ident["preprocessing"].get("image_size", 0) or 0),
        "vocab_size": int(tok["vocab_size"]), "tokens_per_example": L,
        "patch_nums": pn, "token_dtype": np.dtype(dtype).name,
        "num_classes": ident["num_classes"], "num_images": ident["num_images"],
        "num_views": V, "num_records": ident["num_images"] * V,
        "record_order": "image-major, view-minor: global record id = image_index * num_views + view",
        "preprocessing": ident["preprocessing"], "source": ident["source"],
        "images_per_shard": ident["images_per_shard"],
        "shards": [{"file": s.filename, "num_records": s.num_images * V,
                    "first_image": s.first_image, "num_images": s.num_images} for s in plan],
        "writer_options": WRITER_OPTIONS,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        meta["extra"] = extra
    try:
        write_tfds_metadata(out_dir, meta)
    except Exception as e:  # noqa: BLE001 - TFDS metadata is a convenience, not needed to train
        logging.warning("TFDS metadata not written (%s); the dataset is still readable.", e)
    _write_text_atomic(os.path.join(out_dir, METADATA_FILE), json.dumps(meta, indent=1))
    return meta


def write_tfds_metadata(out_dir: str, meta: dict) -> None:
    """``dataset_info.json`` + ``features.json`` so ``tfds.builder_from_directory`` reads the shards."""
    import tensorflow_datasets as tfds
    feats = records.tfds_features(meta["tokens_per_example"], meta["vocab_size"], meta["num_classes"])
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[s["num_records"] for s in meta["shards"]],
                                num_bytes=0, filename_template=None)
    desc = (f"{meta['name']}: {meta['tokenizer']['name']} tokens ({meta['tokens_per_example']} per "
            f"example, vocab {meta['vocab_size']}) of {meta['num_images']} images x "
            f"{meta['num_views']} views; see {METADATA_FILE}.")
    tfds.folder_dataset.write_metadata(data_dir=out_dir, features=feats, split_infos=[split],
                                       check_data=False, description=desc)


def read_metadata(path: str) -> dict:
    """``token_dataset.json`` of a dataset directory (raises naming the directory if absent)."""
    f = os.path.join(path, METADATA_FILE)
    if not _exists(f):
        raise FileNotFoundError(
            f"{f} does not exist: {path} is not a finished token dataset. Run the tokenize job "
            "(configs/tokenize_*.py) to write it, or fix config.data.path.")
    return json.loads(_read_text(f))
