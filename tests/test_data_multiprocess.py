"""Two real JAX processes (jax.distributed on localhost, 4 CPU devices each): both write their
shards with a jitted tokenizer on their own devices, then read their rows of a global batch and
assemble it with ``jax.make_array_from_process_local_data``."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, V, L, GB = 11, 2, 5, 16


def _dataset():
    g = np.random.default_rng(0)
    return g.integers(0, 90, (N, V, L)), g.integers(0, 4, (N,))


def worker(pid: int, port: int, path: str, out: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils

    from cca_jax import sharding
    from cca_jax.data import reader, sources, testing, tokenizers, writer

    tokens, labels = _dataset()
    tok = tokenizers.JaxTokenizer(
        lambda p, x: (x.reshape(x.shape[0], -1) * p).astype(np.int32), np.float32(1.0),
        name="scaled", family="array", vocab_size=100, checksum="c", batch_size=4)
    assert tok.mesh.devices.size == jax.local_device_count() == 4
    meta = writer.write_dataset(path, source=sources.ArraySource(list(tokens), labels, 4),
                                views=testing.TokenViews(V), tokenizer=tok, name="mp",
                                images_per_shard=2, num_workers=0, progress=False)
    assert meta["num_records"] == N * V  # every process sees the finished metadata
    mesh = sharding.make_mesh()
    rows = reader.rows_for_sharding(sharding.batch_sharding(mesh, 1), GB)
    it = reader.TokenIterator(reader.ShardStore(path), global_batch_size=GB, rows=rows, seed=5)
    next(it)
    local = next(it)
    g = reader.make_global_batch(local, mesh, GB)
    full = multihost_utils.process_allgather(g["tokens"], tiled=True)
    labs = multihost_utils.process_allgather(g["labels"], tiled=True)
    all_rows = multihost_utils.process_allgather(rows)
    if pid == 0:
        np.savez(out, tokens=full, labels=labs, rows=all_rows)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_and_read_disjoint_rows(tmp_path):
    path, out, port = str(tmp_path / "tokens"), str(tmp_path / "out.npz"), _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(p), str(port), path, out],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for p in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]

    from cca_jax.data import reader, writer
    meta = writer.read_metadata(path)
    assert json.loads(json.dumps(meta))["num_images"] == N and len(meta["shards"]) == 6
    tokens, labels = _dataset()
    exs = reader.ShardStore(path).read(np.arange(N * V))
    assert [e["tokens"].tolist() for e in exs] == tokens.reshape(N * V, L).tolist()

    res = np.load(out)
    r0, r1 = res["rows"]
    assert not set(r0) & set(r1) and sorted(set(r0) | set(r1)) == list(range(GB))
    single = reader.TokenIterator(reader.ShardStore(path), global_batch_size=GB,
                                  rows=np.arange(GB), seed=5)
    next(single)
    want = next(single)
    np.testing.assert_array_equal(res["tokens"], want["tokens"])
    np.testing.assert_array_equal(res["labels"], want["labels"])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
