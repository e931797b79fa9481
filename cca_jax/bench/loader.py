"""Input pipeline throughput: examples/s one host's reader delivers from realistic shards.

    python -m cca_jax.bench.loader [--recipe llamagen|var|both] [--images 4000] [--batch 256]
        [--processes 1] [--seconds 10] [--dir /tmp/cca_loader_bench] [--step_examples_per_s 1.0]

Writes a dataset shaped like the real ones through the real writer (LlamaGen: 10 views × 576
int16 tokens per image, vocab 16384; VAR: 1 view × 680 int16 tokens, vocab 4096; random tokens,
1000 classes, 1024 images per shard), then reads it with the training reader
(``reader.make_dataset`` path: seeded shuffle, random view per image, random access into the
ArrayRecord shards, protobuf decode, range checks, background prefetch) as process 0 of
``--processes`` feeding its rows of a global batch of ``--batch``, and prints examples/s, tokens/s
and the margin over what the training step consumes (``--step_examples_per_s``; the CCA step on
this 2-core CPU consumes about one LlamaGen example per second).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

RECIPES = {  # name: (views, tokens per example, vocab)
    "llamagen": (10, 576, 16384),
    "var": (1, 680, 4096),
}


def build(path: str, recipe: str, images: int) -> dict:
    from cca_jax.data import testing, writer
    views, L, vocab = RECIPES[recipe]
    if os.path.exists(os.path.join(path, writer.METADATA_FILE)):
        return writer.read_metadata(path)
    shutil.rmtree(path, ignore_errors=True)
    g = np.random.default_rng(0)
    tokens = g.integers(0, vocab, (images, views, L), dtype=np.int32)
    labels = g.integers(0, 1000, (images,))
    t0 = time.perf_counter()
    meta = testing.write_token_dataset(path, tokens, labels, vocab_size=vocab, num_classes=1000,
                                       images_per_shard=1024, name=f"bench_{recipe}")
    dt = time.perf_counter() - t0
    print(f"[{recipe}] wrote {meta['num_records']} records in {len(meta['shards'])} shards "
          f"({sum(os.path.getsize(os.path.join(path, s['file'])) for s in meta['shards']) / 2**20:.1f} MiB) "
          f"in {dt:.1f}s ({meta['num_records'] / dt:.0f} records/s incl. the fake encode)")
    return meta


def measure(path: str, meta: dict, *, batch: int, processes: int, seconds: float,
            prefetch: int) -> float:
    from cca_jax.data import reader
    store = reader.ShardStore(path, meta)
    it = reader.TokenIterator(store, global_batch_size=batch,
                              rows=reader.default_rows(0, processes, batch), seed=0,
                              views="random", num_classes=1000, vocab_size=meta["vocab_size"],
                              prefetch=prefetch)
    next(it)  # open the shards, start the prefetch thread
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["tokens"].shape[0]
    dt = time.perf_counter() - t0
    it.close()
    return n / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="both", choices=["llamagen", "var", "both"])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--processes", type=int, default=1, help="hosts sharing the global batch")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--dir", default="/tmp/cca_loader_bench")
    ap.add_argument("--step_examples_per_s", type=float, default=1.0,
                    help="examples/s the training step consumes on this host")
    args = ap.parse_args(argv)
    recipes = ["llamagen", "var"] if args.recipe == "both" else [args.recipe]
    for r in recipes:
        path = os.path.join(args.dir, r)
        meta = build(path, r, args.images)
        for prefetch in (0, 2):
            eps = measure(path, meta, batch=args.batch, processes=args.processes,
                          seconds=args.seconds, prefetch=prefetch)
            L = meta["tokens_per_example"]
            print(f"[{r}] host 0 of {args.processes}, global batch {args.batch}, prefetch "
                  f"{prefetch}: {eps:,.0f} examples/s per host ({eps * L:,.0f} tokens/s) = "
                  f"{eps / args.step_examples_per_s:,.0f}x the step's "
                  f"{args.step_examples_per_s:g} examples/s (needed: 10x)")


if __name__ == "__main__":
    main()
