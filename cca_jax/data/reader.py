"""Per-process reader of token datasets: a global example order, this process's rows of every
global batch, an exactly resumable position, and checks that nothing is silently wrong.

Global order (independent of the number of processes)
  The stream is a sequence of examples at global positions ``0, 1, 2, ...``; epoch
  ``e = pos // E`` and ``j = pos % E`` with ``E`` examples per epoch. With ``views="random"``
  (default; LlamaGen's ``CustomDataset`` draws a random crop per ``__getitem__``) an epoch is
  every image once: image ``perm_e[j]``, view ``u_e(image) mod num_views``; with ``views="all"``
  every record once: record ``perm_e[j]``. ``perm_e`` sorts 64-bit splitmix hashes of
  ``(seed, e, index)`` and ``u_e`` is another such hash, so the order depends only on the seed and
  the dataset (not on numpy's Generator algorithms, the process count or the batch size).
  Global batch ``b`` is positions ``[pos_b, pos_b + GB)``; batches run straight across epoch
  boundaries (no padding, no dropped remainder).

This process's share
  ``rows``: the row indices of the global batch that this process feeds (its devices' rows).
  By default process ``p`` of ``P`` feeds the contiguous block ``[p·GB/P, (p+1)·GB/P)``; pass
  ``rows=rows_for_sharding(sharding, GB)`` when the step's batch sharding lays rows out
  differently. Processes read disjoint records (random access into the ArrayRecord shards), and
  :func:`make_global_batch` assembles the global ``jax.Array`` with
  ``jax.make_array_from_process_local_data``.

State
  ``get_state()`` is a JSON-able dict whose ``position`` is the global position of the next
  batch; restoring it (``set_state``) yields exactly the same next examples — also with a
  different number of processes or devices, because the order is defined globally (each
  process then simply takes its new rows). A different global batch size continues from the same
  example position too. The seed, views mode and dataset size must match the saved ones (checked).
  The state is identical on every process (Orbax saves one copy); per-process counters such as
  ``stats["skipped"]`` are logged, not saved.

Bad data
  A shard that cannot be opened or whose record count differs from the metadata (truncated), a
  record that does not parse, a token ≥ vocab or < 0, or a label outside ``[0, num_classes)``
  raise :class:`BadDataError` naming the file and the record index in it. With
  ``config.data.on_bad_record = "skip"`` such an example is replaced by the next good example of
  the same local batch (static shapes), counted in ``stats["skipped"]`` and logged.

Batches are dicts of numpy arrays: ``tokens`` int32 ``[b, L]``, ``labels`` int32 ``[b]``.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from cca_jax.data import records, writer

ORDER_VERSION = 1
_LIVE: "weakref.WeakSet[TokenIterator]" = weakref.WeakSet()


@atexit.register
def _stop_prefetch_threads():  # a reader thread inside C++ at interpreter exit aborts the process
    for it in list(_LIVE):
        it._shutdown()
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class BadDataError(ValueError):
    """A shard or record is unreadable or holds values outside the declared ranges."""


class MetadataMismatchError(ValueError):
    """The dataset was written for a different model/tokenizer than the config describes."""


# ----------------------------------------------------------------------------------------------
# global order

def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, epoch: int, stream: int, idx: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([(seed * 0x100000001B3 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        return _splitmix64(idx.astype(np.uint64) ^ key)


class GlobalOrder:
    """Maps global stream positions to record ids (see the module docstring)."""

    def __init__(self, num_images: int, num_views: int, seed: int, views: str = "random",
                 shuffle: bool = True):
        if views not in ("random", "all"):
            raise ValueError(f"config.data.views={views!r}; choose 'random' (one view per image "
                             "per epoch, the official LlamaGen sampling) or 'all'.")
        self.num_images, self.num_views, self.seed = int(num_images), int(num_views), int(seed)
        self.views, self.shuffle = views, shuffle
        self.epoch_size = self.num_images if views == "random" else self.num_images * self.num_views
        if self.epoch_size < 1:
            raise ValueError("The dataset is empty.")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def _epoch(self, e: int):
        if e not in self._cache:
            idx = np.arange(self.epoch_size, dtype=np.uint64)
            perm = (np.argsort(_hash(self.seed, e, 0, idx), kind="stable") if self.shuffle
                    else np.arange(self.epoch_size))
            view = None
            if self.views == "random":
                view = (_hash(self.seed, e, 1, idx) % np.uint64(self.num_views)).astype(np.int64)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = (perm.astype(np.int64), view)
        return self._cache[e]

    def records(self, positions: np.ndarray) -> np.ndarray:
        """Global record ids ``[n]`` of stream positions ``[n]``."""
        positions = np.asarray(positions, np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.epoch_size
        for e in np.unique(epochs):
            sel = epochs == e
            perm, view = self._epoch(int(e))
            j = perm[positions[sel] % self.epoch_size]
            out[sel] = j if view is None else j * self.num_views + view[j]
        return out


# ----------------------------------------------------------------------------------------------
# record stores

class ShardStore:
    """Random access to the records of a dataset written by ``cca_jax/data/writer.py``."""

    def __init__(self, path: str, meta: Mapping[str, Any] | None = None):
        self.path = path
        self.meta = dict(meta or writer.read_metadata(path))
        m = self.meta
        self.num_images, self.num_views = int(m["num_images"]), int(m["num_views"])
        self.num_records = int(m["num_records"])
        self.tokens_per_example, self.vocab_size = int(m["tokens_per_example"]), int(m["vocab_size"])
        self.num_classes = int(m["num_classes"])
        self.dtype = np.dtype(m["token_dtype"])
        self.files = [s["file"] for s in m["shards"]]
        counts = np.asarray([int(s["num_records"]) for s in m["shards"]], np.int64)
        if counts.sum() != self.num_records:
            raise BadDataError(f"{path}/{writer.METADATA_FILE}: shard record counts sum to "
                               f"{counts.sum()}, metadata says num_records={self.num_records}.")
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._check_files_exist()
        self._readers: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _check_files_exist(self) -> None:
        """A missing shard is a setup error, found at start-up rather than hours into a run (and
        not skipped as bad records under ``on_bad_record='skip'``)."""
        from etils import epath
        present = {p.name for p in epath.Path(self.path).iterdir()}
        missing = [f for f in self.files if f not in present]
        if missing:
            raise BadDataError(
                f"{len(missing)} of the {len(self.files)} shards listed in {self.path}/"
                f"{writer.METADATA_FILE} are missing (e.g. {missing[:3]}); copy them back or re-run "
                "the tokenize job, which writes the missing shards.")

    def locate(self, rid: int) -> tuple[str, int]:
        k = int(np.searchsorted(self.starts, rid, side="right") - 1)
        return os.path.join(self.path, self.files[k]), int(rid - self.starts[k])

    def _reader(self, k: int):
        from array_record.python import array_record_module as arm
        with self._lock:
            r = self._readers.get(k)
            if r is None:
                f = os.path.join(self.path, self.files[k])
                expected = int(self.starts[k + 1] - self.starts[k])
                try:
                    r = arm.ArrayRecordReader(f, "readahead_buffer_size:0")
                    n = r.num_records()
                except Exception as e:  # noqa: BLE001
                    raise BadDataError(f"Cannot open shard {f} ({e}); it is missing, truncated "
                                       "or corrupt. Re-run the tokenize job (it rewrites "
                                       "incomplete shards) after deleting it.") from None
                if n != expected:
                    raise BadDataError(f"Shard {f} has {n} records, {writer.METADATA_FILE} "
                                       f"expects {expected} (truncated or replaced file).")
                self._readers[k] = r
            return r

    def read(self, rids: np.ndarray) -> list:
        """Per record id: the decoded example dict, or a :class:`BadDataError` (not raised)."""
        rids = np.asarray(rids, np.int64)
        out: list = [None] * len(rids)
        shard = np.searchsorted(self.starts, rids, side="right") - 1
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = (rids[sel] - self.starts[k]).tolist()
            f = os.path.join(self.path, self.files[int(k)])
            try:
                r = self._reader(int(k))
            except BadDataError as e:
                for i in sel:
                    out[i] = e
                continue
            try:
                raw = r.read(local)
            except Exception:  # noqa: BLE001 - find which record(s) fail
                raw = []
                for li in local:
                    try:
                        raw.append(r.read([li])[0])
                    except Exception as e:  # noqa: BLE001
                        raw.append(BadDataError(f"Corrupt record {li} of shard {f}: {e}"))
            for i, li, rb in zip(sel, local, raw):
                if isinstance(rb, Exception):
                    out[i] = rb
                    continue
                try:
                    out[i] = records.decode_example(rb, self.dtype, self.tokens_per_example)
                except records.RecordDecodeError as e:
                    out[i] = BadDataError(f"Corrupt record {li} of shard {f}: {e}")
        return out

    def close(self):
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()


def _source_identity(meta: Mapping[str, Any]) -> dict:
    """The dataset's source description without where it was read from (a copy of ImageNet at
    another path is the same images)."""
    return {k: v for k, v in (meta.get("source") or {}).items() if k not in ("root", "data_dir")}


class CropSetMix:
    """Several crop sets of the same images as one store whose views are all of theirs.

    LlamaGen's dataset optionally reads a second code set extracted with ``--crop-range 1.05``
    (``…ten_crop_105``) and takes each example from either set with probability 1/2 (data.md
    §1.4). Here set ``s``'s view ``v`` becomes view ``s·V + v`` of the image, so
    ``views="random"`` (a uniform view per image per epoch) picks a set uniformly and then a crop
    uniformly — the official distribution — and ``views="all"`` reads every record of every set
    once per epoch.
    The sets must be the same images in the same order (the tokenize job run twice on one input)
    with the same views count, tokenizer and classes; anything else is refused.
    """

    def __init__(self, stores: Sequence[ShardStore]):
        if len(stores) < 2:
            raise ValueError("CropSetMix needs at least two crop sets.")
        first = stores[0]
        for other in stores[1:]:
            diff = [k for k in ("num_images", "num_views", "num_classes", "vocab_size",
                                "tokens_per_example")
                    if getattr(other, k) != getattr(first, k)]
            m0, m1 = first.meta, other.meta
            if _source_identity(m1) != _source_identity(m0):
                diff.append("source (the images tokenized)")
            if m1.get("tokenizer", {}).get("checksum") != m0.get("tokenizer", {}).get("checksum"):
                diff.append("tokenizer checksum")
            if diff:
                raise MetadataMismatchError(
                    f"config.data.mix_paths: {other.path} is not another crop set of "
                    f"{first.path}; they differ in {', '.join(diff)}. Tokenize the same input "
                    "with the same tokenizer, changing only config.tokenize.crop_range (and name).")
        self.stores = list(stores)
        self.path = " + ".join(s.path for s in self.stores)
        self.meta = dict(first.meta, crop_sets=[s.path for s in self.stores])
        self.set_views = first.num_views
        self.num_images, self.num_classes = first.num_images, first.num_classes
        self.num_views = self.set_views * len(self.stores)
        self.num_records = self.num_images * self.num_views
        self.tokens_per_example, self.vocab_size = first.tokens_per_example, first.vocab_size

    def _split(self, rids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record ids of the mix → (crop set index, record id within that set)."""
        image, view = np.divmod(np.asarray(rids, np.int64), self.num_views)
        which, local_view = np.divmod(view, self.set_views)
        return which, image * self.set_views + local_view

    def locate(self, rid: int) -> tuple[str, int]:
        which, local = self._split(np.asarray([rid]))
        return self.stores[int(which[0])].locate(int(local[0]))

    def read(self, rids: np.ndarray) -> list:
        which, local = self._split(rids)
        out: list = [None] * len(local)
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            for i, ex in zip(sel, self.stores[int(s)].read(local[sel])):
                out[i] = ex
        return out

    def close(self):
        for s in self.stores:
            s.close()


class SyntheticStore:
    """``num_images`` deterministic random examples (tokens uniform in [0, V), labels uniform in
    [0, num_classes)) for smoke tests (``config.data.source = "synthetic"``)."""

    num_views = 1

    def __init__(self, num_images: int, tokens_per_example: int, vocab_size: int,
                 num_classes: int, seed: int = 0):
        self.num_images = self.num_records = int(num_images)
        self.tokens_per_example, self.vocab_size = int(tokens_per_example), int(vocab_size)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.path = "synthetic"
        self.meta = {"vocab_size": self.vocab_size, "tokens_per_example": self.tokens_per_example,
                     "num_classes": self.num_classes, "num_images": self.num_images}

    def locate(self, rid: int) -> tuple[str, int]:
        return "synthetic", int(rid)

    def read(self, rids: np.ndarray) -> list:
        out = []
        for rid in np.asarray(rids, np.int64):
            h = _hash(self.seed, int(rid), 2, np.arange(self.tokens_per_example + 1, dtype=np.uint64))
            out.append({"tokens": (h[1:] % np.uint64(self.vocab_size)).astype(np.int32),
                        "label": int(h[0] % np.uint64(self.num_classes)), "view": 0,
                        "image_index": int(rid)})
        return out

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# iterator

def default_rows(process_index: int, process_count: int, global_batch_size: int) -> np.ndarray:
    """Contiguous block ``[p·GB/P, (p+1)·GB/P)`` of the global batch rows."""
    if global_batch_size % process_count:
        raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes; change config.train.global_batch_size.")
    n = global_batch_size // process_count
    return np.arange(process_index * n, (process_index + 1) * n, dtype=np.int64)


def rows_for_sharding(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
    """Sorted global batch rows held by this process's devices under ``sharding`` (a batch-axis
    sharding of any rank; only its leading axis matters)."""
    from jax.sharding import NamedSharding, PartitionSpec
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 1:
        sharding = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))
    idx = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for sl in idx.values():
        s = sl[0] if isinstance(sl, tuple) and sl else slice(None)
        rows.update(range(*s.indices(global_batch_size)))
    return np.asarray(sorted(rows), np.int64)


class TokenIterator:
    """Iterator of this process's slice of each global batch (see the module docstring)."""

    def __init__(self, store, *, global_batch_size: int, rows: Sequence[int], seed: int = 0,
                 views: str = "random", num_classes: int | None = None,
                 vocab_size: int | None = None, on_bad_record: str = "error", prefetch: int = 2,
                 shuffle: bool = True):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"config.data.on_bad_record={on_bad_record!r}; choose error or skip.")
        self.store = store
        self.global_batch_size = int(global_batch_size)
        self.rows = np.asarray(rows, np.int64)
        if self.rows.size == 0 or self.rows.min() < 0 or self.rows.max() >= self.global_batch_size:
            raise ValueError(f"rows {self.rows[:8]}... must lie in [0, {self.global_batch_size}).")
        self.order = GlobalOrder(store.num_images, store.num_views, seed, views, shuffle)
        self.num_classes = int(num_classes if num_classes is not None else store.num_classes)
        self.vocab_size = int(vocab_size if vocab_size is not None else store.vocab_size)
        self.on_bad_record, self.prefetch = on_bad_record, int(prefetch)
        self.seed, self.views = int(seed), views
        self.stats = {"skipped": 0, "batches": 0}
        self._position = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        _LIVE.add(self)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int:
        """Examples per epoch (images with views='random', records with views='all')."""
        return self.order.epoch_size

    def steps_per_epoch(self) -> float:
        return self.epoch_size / self.global_batch_size

    @property
    def epoch(self) -> float:
        return self._position / self.epoch_size

    # ---- state -----------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": ORDER_VERSION, "position": int(self._position), "seed": self.seed,
                "views": self.views, "epoch_size": int(self.epoch_size),
                "num_records": int(self.store.num_records)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for k, mine in (("version", ORDER_VERSION), ("seed", self.seed), ("views", self.views),
                        ("epoch_size", self.epoch_size), ("num_records", self.store.num_records)):
            if k in state and state[k] != mine:
                raise ValueError(f"Saved data iterator state has {k}={state[k]!r} but this run has "
                                 f"{mine!r}; restoring would not continue the same stream. Use the "
                                 "same dataset (config.data.path), config.data.shuffle_seed and "
                                 "config.data.views, or start the data stream afresh.")
        self._shutdown()
        self._position = int(state["position"])

    # aliases used by cca_jax/train.py
    def state(self) -> dict:
        return self.get_state()

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if state:
            self.set_state(state)

    @property
    def num_examples(self) -> int:
        return self.epoch_size

    size = num_examples

    # ---- batches ---------------------------------------------------------------------------
    def batch_at(self, position: int) -> dict:
        """This process's rows of the global batch starting at ``position`` (no side effects)."""
        return self._read_batch(position)[0]

    def _read_batch(self, position: int) -> tuple[dict, int]:
        """(:meth:`batch_at`, how many bad examples it skipped). The count is added to
        ``stats["skipped"]`` when the batch is handed out, so a read-ahead thread never counts
        batches the consumer has not taken."""
        rids = self.order.records(position + self.rows)
        examples = self.store.read(rids)
        bad = [i for i, ex in enumerate(examples) if isinstance(ex, Exception)]
        for i, ex in enumerate(examples):
            if isinstance(ex, Exception):
                continue
            t, lab = ex["tokens"], ex["label"]
            if t.size and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
                f, li = self.store.locate(int(rids[i]))
                v = int(t.max()) if int(t.max()) >= self.vocab_size else int(t.min())
                examples[i] = BadDataError(f"Record {li} of shard {f} holds token {v} outside "
                                           f"[0, {self.vocab_size}) (vocab_size).")
                bad.append(i)
            elif not 0 <= lab < self.num_classes:
                f, li = self.store.locate(int(rids[i]))
                examples[i] = BadDataError(f"Record {li} of shard {f} has label {lab} outside "
                                           f"[0, {self.num_classes}) (num_classes).")
                bad.append(i)
        if bad:
            if self.on_bad_record == "error":
                raise examples[min(bad)]
            bad_set = set(bad)
            good = [i for i in range(len(examples)) if i not in bad_set]
            if not good:
                raise BadDataError(f"Every example of the local batch at position {position} is "
                                   f"bad; first: {examples[min(bad)]}")
            for i in sorted(bad_set):
                logging.warning("Skipping bad example: %s", examples[i])
                nxt = next((g for g in good if g > i), good[0])
                examples[i] = examples[nxt]
        L = self.store.tokens_per_example
        tokens = np.empty((len(examples), L), np.int32)
        labels = np.empty((len(examples),), np.int32)
        for i, ex in enumerate(examples):
            tokens[i] = ex["tokens"]
            labels[i] = ex["label"]
        return {"tokens": tokens, "labels": labels}, len(bad)

    def _producer(self, start: int, q: queue.Queue, stop: threading.Event):
        pos = start
        while not stop.is_set():
            try:
                item = (pos, self._read_batch(pos))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                item = (pos, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            pos += self.global_batch_size

    def _shutdown(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue = None, None
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            batch, skipped = self._read_batch(self._position)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._producer, daemon=True,
                                                args=(self._position, self._queue, self._stop))
                self._thread.start()
            pos, item = self._queue.get()
            assert pos == self._position, (pos, self._position)
            if isinstance(item, Exception):
                self._shutdown()
                raise item
            batch, skipped = item
        self._position += self.global_batch_size
        self.stats["skipped"] += skipped
        self.stats["batches"] += 1
        return batch

    def close(self):
        self._shutdown()
        self.store.close()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------
# config plumbing

def model_expectations(config) -> dict:
    """What the model config implies about the data: vocab, tokens per example, patch_nums,
    classes and tokenizer family (entries are None when the config does not say)."""
    m, t = config.model, config.get("tokenizer", {}) or {}
    pn = m.get("patch_nums", None)
    if pn is not None:
        pn = [int(x) for x in pn]
        tokens = sum(x * x for x in pn)
    else:
        tokens = m.get("block_size", None)
    return {"vocab_size": m.get("vocab_size", None), "tokens_per_example": tokens,
            "patch_nums": pn, "num_classes": m.get("num_classes", None),
            "tokenizer_family": t.get("family", None) or None,
            "tokenizer_checksum": config.data.get("tokenizer_checksum", "") or None}


def check_metadata(meta: Mapping[str, Any], config, path: str = "") -> None:
    """Raises :class:`MetadataMismatchError` naming the dataset's and the config's value."""
    want = model_expectations(config)
    where = f"{path}/{writer.METADATA_FILE}" if path else writer.METADATA_FILE
    problems = []

    def cmp(name, have, cfg_name, expect):
        if expect is not None and have != expect:
            problems.append(f"{name}: dataset has {have!r} ({where}), config has {expect!r} ({cfg_name})")
    cmp("vocab_size", meta.get("vocab_size"), "config.model.vocab_size", want["vocab_size"])
    cmp("tokens per example", meta.get("tokens_per_example"),
        "config.model.patch_nums" if want["patch_nums"] else "config.model.block_size",
        want["tokens_per_example"])
    if want["patch_nums"] is not None or meta.get("patch_nums") is not None:
        cmp("patch_nums", meta.get("patch_nums"), "config.model.patch_nums", want["patch_nums"])
    tok = meta.get("tokenizer", {})
    cmp("tokenizer family", tok.get("family"), "config.tokenizer.family", want["tokenizer_family"])
    cmp("tokenizer checksum", tok.get("checksum"), "config.data.tokenizer_checksum",
        want["tokenizer_checksum"])
    if want["num_classes"] is not None and meta.get("num_classes", 0) > want["num_classes"]:
        problems.append(f"num_classes: dataset has {meta.get('num_classes')} classes ({where}), "
                        f"config.model.num_classes is {want['num_classes']}")
    if problems:
        raise MetadataMismatchError(
            "The token dataset does not match the model config:\n  " + "\n  ".join(problems)
            + "\n  Point config.data.path at a dataset tokenized for this model, or re-tokenize "
              "with the matching configs/tokenize_*.py.")


def _split_paths(paths) -> list[str]:
    """``config.data.mix_paths``: comma-separated directories (or a list) → list of paths."""
    if isinstance(paths, str):
        paths = paths.split(",")
    return [p.strip() for p in paths if p and p.strip()]


def make_dataset(config, *, process_index: int | None = None, process_count: int | None = None,
                 global_batch_size: int | None = None, rows: Sequence[int] | None = None,
                 prefetch: int | None = None) -> TokenIterator:
    """The training input iterator of this process (``config.data``; see the module docstring).

    ``config.data.source``: ``shards`` (``config.data.path`` from the tokenize job) or
    ``synthetic`` (``config.data.synthetic_size`` random examples shaped by ``config.model``).
    ``config.data.mix_paths``: further crop sets of the same images read as one dataset
    (:class:`CropSetMix`; LlamaGen's optional ``ten_crop_105`` set).
    """
    p = jax.process_index() if process_index is None else int(process_index)
    P = jax.process_count() if process_count is None else int(process_count)
    gb = int(global_batch_size or config.train.global_batch_size)
    rows = default_rows(p, P, gb) if rows is None else np.asarray(rows, np.int64)
    d = config.data
    want = model_expectations(config)
    if d.source == "synthetic":
        if want["tokens_per_example"] is None or want["vocab_size"] is None:
            raise ValueError("config.data.source='synthetic' needs config.model.vocab_size and "
                             "block_size (LlamaGen) or patch_nums (VAR).")
        store = SyntheticStore(d.synthetic_size, want["tokens_per_example"], want["vocab_size"],
                               want["num_classes"] or 1000, seed=d.shuffle_seed)
    elif d.source == "shards":
        if not d.path:
            raise ValueError("config.data.path is empty; set it to the directory written by the "
                             "tokenize job (configs/tokenize_*.py).")
        stores = []
        mix = _split_paths(d.get("mix_paths", ""))
        for path in [d.path, *mix]:
            try:
                meta = writer.read_metadata(path)
            except FileNotFoundError as e:
                if path == d.path:
                    raise
                raise FileNotFoundError(f"config.data.mix_paths: {e}") from None
            check_metadata(meta, config, path)
            stores.append(ShardStore(path, meta))
        store = stores[0] if len(stores) == 1 else CropSetMix(stores)
    else:
        raise ValueError(f"config.data.source={d.source!r}; choose shards or synthetic.")
    return TokenIterator(
        store, global_batch_size=gb, rows=rows, seed=d.shuffle_seed,
        views=d.get("views", "random"), num_classes=want["num_classes"],
        vocab_size=want["vocab_size"], on_bad_record=d.get("on_bad_record", "error"),
        prefetch=d.get("prefetch", 2) if prefetch is None else prefetch,
        shuffle=d.get("shuffle", True))


def make_train_iterator(config, *, family=None, rows=None) -> TokenIterator:
    """``cca_jax/train.py``'s entry point: ``rows`` (a slice or indices) from its mesh."""
    del family  # everything needed is in config.model / config.data
    gb = int(config.train.global_batch_size)
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(gb), dtype=np.int64)
    return make_dataset(config, global_batch_size=gb, rows=rows)


def make_global_batch(local: Mapping[str, np.ndarray], sharding, global_batch_size: int) -> dict:
    """Process-local batch → global ``jax.Array``s via ``jax.make_array_from_process_local_data``.

    ``sharding``: a ``NamedSharding`` for the leading (batch) axis — used for every array, its
    spec padded with ``None`` for trailing axes — or a ``Mesh`` (then
    ``sharding.batch_sharding(mesh, ndim)``) or a dict of shardings per key.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cca_jax import sharding as sh
    out = {}
    for k, x in local.items():
        s = sharding[k] if isinstance(sharding, Mapping) else sharding
        if isinstance(s, Mesh):
            s = sh.batch_sharding(s, x.ndim)
        elif isinstance(s, NamedSharding) and len(s.spec) != x.ndim:
            spec = (*s.spec, *([None] * x.ndim))[:x.ndim]
            s = NamedSharding(s.mesh, PartitionSpec(*spec))
        out[k] = jax.make_array_from_process_local_data(s, x, (global_batch_size, *x.shape[1:]))
    return out
