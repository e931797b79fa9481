"""Checkpoints: save/restore, other meshes and device counts, crashes mid-save, kill -9, SIGTERM.

Subprocess cases run this file as a script (``python tests/test_checkpoint.py MODE ...``) because
the fake device count (XLA_FLAGS) must be set before jax is imported.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from cca_jax import checkpoint as ckpt  # noqa: E402
from cca_jax import sharding  # noqa: E402
from cca_jax.preemption import PreemptionWatcher  # noqa: E402

BATCH = 4  # examples per step; the data position saved with each checkpoint


# ------------------------------------------------------------------------- a tiny "train run"

def init_state(rng):
    """Train-state pytree with logical-partitioning boxes, like the trainer's."""
    k1, k2, k3 = jax.random.split(rng, 3)
    lp = nn.with_logical_partitioning
    params = {
        "tok": lp(nn.initializers.normal(1.0), ("vocab", "embed"))(k1, (16, 16)),
        "mlp": {"w": lp(nn.initializers.normal(1.0), ("embed", "mlp"))(k2, (16, 32)),
                "b": lp(nn.initializers.normal(1.0), ("mlp",))(k3, (32,))},
        "norm": lp(nn.initializers.ones, ("norm",))(k3, (16,)),
    }
    opt_state = _optimizer().init(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
            "rng": jax.random.key(7)}


def _optimizer():
    return optax.adamw(1e-2, b2=0.95, weight_decay=0.05)


@jax.jit
def train_step(state):
    rng, k = jax.random.split(state["rng"])
    noise = jax.random.normal(k, ())
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + noise, state["params"])
    updates, opt_state = _optimizer().update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "rng": rng}


def setup(mesh_shape=None, init=True):
    """(mesh, abstract state, target shardings, initial state or None)."""
    mesh = sharding.make_mesh(mesh_shape)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    shardings = sharding.boxed_shardings(abstract, mesh)
    state = None
    if init:  # a fresh (shallow) copy each time: tests edit the dicts
        state = jax.tree_util.tree_map(lambda x: x, _initial_state(json.dumps(mesh_shape)))
    return mesh, abstract, shardings, state


@functools.lru_cache(maxsize=None)
def _initial_state(mesh_shape_json):
    mesh = sharding.make_mesh(json.loads(mesh_shape_json))
    return sharding.sharded_init(init_state, mesh, jax.random.PRNGKey(0))


def to_numpy(tree):
    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return {jax.tree_util.keystr(p): leaf(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_after(n_steps):
    """Reference trajectory, computed in the test process (8 devices)."""
    _, _, _, state = setup()
    for _ in range(n_steps):
        state = train_step(state)
    return to_numpy(state)


def restore_in_process(workdir):
    """What a restarted run sees."""
    _, abstract, shardings, _ = setup(init=False)
    with ckpt.CheckpointManager(workdir) as mngr:
        return mngr.restore_latest(abstract, shardings)


def assert_trees_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------- subprocess workers

def worker_loop(args):
    """Resume from the latest checkpoint, run to --steps, checkpoint; SIGTERM stops it early."""
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    _, abstract, shardings, _ = setup(init=False)
    mngr = ckpt.CheckpointManager(args.workdir, save_every=args.save_every, keep=args.keep,
                                  atomicity=args.atomicity)
    restored = mngr.restore_latest(abstract, shardings)
    if restored is None:
        start, state = 0, setup()[3]
    else:
        assert restored.data_state == {"next_index": restored.step * BATCH}, restored.data_state
        start, state = restored.step, restored.state
        assert int(state["step"]) == start
        print(f"RESUMED {start}", flush=True)
    with PreemptionWatcher() as preempt:
        print(f"READY {preempt.mode}", flush=True)
        for step in range(start + 1, args.steps + 1):
            state = train_step(state)
            time.sleep(args.sleep)
            stop = preempt.reached(step)
            mngr.save(step, state, data_state={"next_index": step * BATCH},
                      force=stop or step == args.steps)
            print(f"STEP {step}", flush=True)
            if step == args.hang_at:
                # Block the final rename/commit of the save just started: the parent kill -9s us.
                from orbax.checkpoint._src.path import atomicity
                mngr.wait_until_finished()

                async def never(*a, **k):
                    time.sleep(3600)
                atomicity.AtomicRenameTemporaryPath.finalize = never
                atomicity.CommitFileTemporaryPath.finalize = never
                mngr.save(step + 1, train_step(state), data_state={}, force=True)
                print("HANGING", flush=True)
                time.sleep(3600)
            if stop:
                print(f"PREEMPTED {step}", flush=True)
                break
    mngr.close()
    print("DONE", flush=True)


def worker_restore(args):
    """Restore the latest checkpoint onto this process's devices and dump it as npz."""
    _, abstract, shardings, _ = setup(json.loads(args.mesh) if args.mesh else None, init=False)
    mngr = ckpt.CheckpointManager(args.workdir)
    r = mngr.restore_latest(abstract, shardings)
    for x, s in zip(jax.tree_util.tree_leaves(r.state), jax.tree_util.tree_leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        assert len(x.sharding.device_set) == jax.device_count()
    np.savez(args.out, step=r.step, data=json.dumps(r.data_state), **to_numpy(r.state))
    mngr.close()


def _run_worker(mode, *args, devices=8, extra_env=None, popen=False, timeout=120):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    cmd = [sys.executable, os.path.abspath(__file__), mode, *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _wait_for_line(proc, prefix, timeout=120):
    """Reads the worker's stdout until a line starting with ``prefix``; returns all lines."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"worker never printed {prefix!r}:\n" + "\n".join(lines))


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return out.splitlines()


# ------------------------------------------------------------------------------------- tests

def test_save_restore_keep_and_interval(tmp_path):
    from configs.common import base_config
    cfg = base_config()
    cfg.train.ckpt_every = 2
    cfg.train.keep_checkpoints = 2
    _, abstract, shardings, state = setup()
    with ckpt.CheckpointManager.from_config(cfg, tmp_path) as mngr:
        assert mngr.restore_latest(abstract, shardings) is None
        assert str(mngr.directory) == str(tmp_path / "checkpoints")
        saved = []
        for step in range(1, 8):
            state = train_step(state)
            saved.append(mngr.save(step, state, data_state={"next_index": step * BATCH}))
        assert saved == [False, True, False, True, False, True, False]
        assert mngr.save(7, state, data_state={"next_index": 7 * BATCH}, force=True)
        mngr.wait_until_finished()
        assert mngr.all_steps() == [6, 7]  # keep=2
        want = to_numpy(state)
    # a fresh manager (new process after a restart) sees the same
    mngr = ckpt.CheckpointManager(tmp_path)
    r = mngr.restore_latest(abstract, shardings)
    assert r.step == 7 and r.data_state == {"next_index": 28}
    assert r.metadata["train"]["ckpt_every"] == 2 and r.metadata["loss"]["type"] == "cca"
    assert_trees_equal(to_numpy(r.state), want)
    assert jax.dtypes.issubdtype(r.state["rng"].dtype, jax.dtypes.prng_key)
    for x, s in zip(jax.tree_util.tree_leaves(r.state), jax.tree_util.tree_leaves(shardings)):
        assert x.sharding == s
    # the restored state trains on exactly like the original
    np.testing.assert_array_equal(
        np.asarray(train_step(r.state)["params"]["tok"]),
        np.asarray(train_step(state)["params"]["tok"]))
    assert not mngr.save(7, state, force=True)  # never overwrites a finished step
    mngr.close()


def test_restore_onto_another_mesh_shape(tmp_path):
    _, _, _, state = setup({"fsdp": 8})
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, state, force=True)
    _, abstract, shardings, _ = setup({"data": 2, "fsdp": 2, "tensor": 2})
    r = ckpt.CheckpointManager(tmp_path).restore_latest(abstract, shardings)
    assert r.state["params"]["mlp"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert_trees_equal(to_numpy(r.state), to_numpy(state))


def test_restore_with_two_devices_after_saving_with_eight(tmp_path):
    _, _, shardings, state = setup()
    assert len(jax.tree_util.tree_leaves(state)[0].sharding.device_set) == 8
    assert shardings["params"]["tok"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    for _ in range(2):
        state = train_step(state)
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, state, data_state={"next_index": 8}, force=True)
    out = tmp_path / "restored.npz"
    _run_worker("restore", "--workdir", tmp_path, "--out", out, devices=2)
    got = dict(np.load(out))
    assert int(got.pop("step")) == 2 and json.loads(str(got.pop("data"))) == {"next_index": 8}
    assert_trees_equal(got, to_numpy(state))


def test_leftover_tmp_dir_is_never_picked_up(tmp_path):
    import shutil
    _, abstract, shardings, state = setup()
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, state, force=True)
    d = tmp_path / "checkpoints"
    # what a save killed before its atomic rename leaves behind
    shutil.copytree(d / "2", d / "5.orbax-checkpoint-tmp-1700000000")
    mngr = ckpt.CheckpointManager(tmp_path)
    assert mngr.latest_step() == 2 and mngr.restore_latest(abstract, shardings).step == 2
    mngr.wait_until_finished()
    assert not (d / "5.orbax-checkpoint-tmp-1700000000").exists()  # cleaned up at start
    mngr.close()


def test_uncommitted_dir_ignored_in_commit_file_mode(tmp_path):
    """gs:// semantics (no atomic rename): a step dir without commit_success.txt is ignored."""
    import shutil
    _, abstract, shardings, state = setup()
    with ckpt.CheckpointManager(tmp_path, atomicity="commit_file") as mngr:
        mngr.save(2, state, force=True)
    d = tmp_path / "checkpoints"
    assert (d / "2" / "commit_success.txt").exists()
    shutil.copytree(d / "2", d / "4")
    (d / "4" / "commit_success.txt").unlink()
    mngr = ckpt.CheckpointManager(tmp_path, atomicity="commit_file")
    assert mngr.all_steps() == [2]
    assert mngr.restore_latest(abstract, shardings).step == 2
    mngr.close()


def test_crash_in_the_middle_of_a_save_resumes_from_the_previous_one(tmp_path):
    proc = _run_worker("loop", "--workdir", tmp_path, "--steps", 100, "--save-every", 2,
                       "--hang-at", 4, popen=True)
    _wait_for_line(proc, "HANGING")
    d = tmp_path / "checkpoints"
    assert [p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name], list(d.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["2", "4"]
    r = restore_in_process(tmp_path)  # what the restarted run does first
    assert r.step == 4 and r.data_state == {"next_index": 4 * BATCH}
    assert_trees_equal(to_numpy(r.state), expected_after(4))
    assert not [p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def test_kill9_at_an_arbitrary_moment_leaves_a_resumable_checkpoint(tmp_path):
    proc = _run_worker("loop", "--workdir", tmp_path, "--steps", 10_000, "--save-every", 1,
                       "--keep", 2, popen=True)
    _wait_for_line(proc, "STEP 3")
    time.sleep(np.random.default_rng().uniform(0.0, 0.5))  # whatever Orbax is doing then
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    r = restore_in_process(tmp_path)
    assert r.step >= 2 and r.data_state == {"next_index": r.step * BATCH}
    assert_trees_equal(to_numpy(r.state), expected_after(r.step))


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    proc = _run_worker("loop", "--workdir", tmp_path, "--steps", 10_000, "--save-every", 1000,
                       "--sleep", 0.05, popen=True)
    _wait_for_line(proc, "STEP 3")
    proc.send_signal(signal.SIGTERM)
    lines = _finish(proc)
    assert proc.returncode == 0, lines
    stopped = int(next(l for l in lines if l.startswith("PREEMPTED")).split()[1])
    assert lines[-1] == "DONE"
    assert ckpt.CheckpointManager(tmp_path).all_steps() == [stopped]  # saved because of SIGTERM
    r = restore_in_process(tmp_path)
    assert r.data_state == {"next_index": stopped * BATCH}
    assert_trees_equal(to_numpy(r.state), expected_after(stopped))


def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_run_worker("loop", "--workdir", tmp_path, "--steps", 10_000, "--save-every", 1000,
                         "--sleep", 0.05, "--num-processes", 2, "--process-id", i,
                         "--coordinator", f"localhost:{port}", devices=4, popen=True)
             for i in range(2)]
    modes = [_wait_for_line(p, "READY")[-1] for p in procs]
    assert modes == ["READY jax"] * 2  # JAX's preemption service is what agrees on the step
    _wait_for_line(procs[1], "STEP 3")
    procs[1].send_signal(signal.SIGTERM)
    outs = [_finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stopped = {int(next(l for l in o if l.startswith("PREEMPTED")).split()[1]) for o in outs}
    assert len(stopped) == 1, outs
    assert ckpt.CheckpointManager(tmp_path).all_steps() == list(stopped)


def test_preemption_watcher_signal_mode_in_process():
    with PreemptionWatcher(mode="signal") as w:
        assert not w.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert w.requested and w.reached(2) and w.reached(3)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_state_is_never_written(tmp_path):
    import pytest
    _, _, _, state = setup()
    state["params"]["mlp"]["b"] = state["params"]["mlp"]["b"].at[3].set(jnp.nan)
    with ckpt.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(ckpt.NonFiniteCheckpointError, match=r"step 5.*\['mlp'\]\['b'\]"):
            mngr.save(5, state, force=True)
        assert mngr.all_steps() == []


def test_restore_into_a_mismatched_state_names_the_problem(tmp_path):
    import pytest
    _, abstract, shardings, state = setup()
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state, force=True)
    abstract = dict(abstract, params=dict(abstract["params"], extra=jax.ShapeDtypeStruct((3,), jnp.float32)))
    shardings = dict(shardings, params=dict(shardings["params"], extra=None))
    with pytest.raises(ckpt.CheckpointRestoreError, match="config.model"):
        ckpt.CheckpointManager(tmp_path).restore_latest(abstract, shardings)


def test_export_and_load_params(tmp_path):
    import pytest
    mesh, abstract, shardings, state = setup()
    path = tmp_path / "export"
    ckpt.export_params(state["params"], path, metadata={"family": "llamagen", "dim": 16})
    assert ckpt.is_params_dir(path) and not ckpt.is_params_dir(tmp_path)
    assert ckpt.params_metadata(path) == {"family": "llamagen", "dim": 16}
    want = to_numpy(state["params"])
    host = ckpt.load_params(path)
    assert isinstance(host["mlp"]["w"], np.ndarray)
    assert_trees_equal(to_numpy(host), want)
    on_mesh = ckpt.load_params(path, shardings=shardings["params"])
    assert on_mesh["tok"].sharding == shardings["params"]["tok"]
    assert_trees_equal(to_numpy(on_mesh), want)
    bf16 = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                  nn.meta.unbox(abstract["params"]))
    low = ckpt.load_params(path, bf16, sharding.replicated(mesh))
    assert low["tok"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low["tok"]), want["['tok']"].astype(jnp.bfloat16))
    with pytest.raises(FileExistsError):
        ckpt.export_params(state["params"], path)
    ckpt.export_params(jax.tree_util.tree_map(lambda x: x * 2, state["params"]), path, overwrite=True)
    np.testing.assert_array_equal(ckpt.load_params(path)["norm"], 2 * want["['norm']"])
    with pytest.raises(FileNotFoundError, match="not an Orbax params directory"):
        ckpt.load_params(tmp_path / "missing")


def test_load_latest_params_reads_only_params(tmp_path):
    _, _, shardings, state = setup()
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, state, force=True)
    step, params = ckpt.load_latest_params(tmp_path)
    assert step == 3 and set(params) == {"tok", "mlp", "norm"}
    assert_trees_equal(to_numpy(params), to_numpy(state["params"]))
    step, params = ckpt.load_latest_params(tmp_path, shardings=shardings["params"])
    assert params["mlp"]["w"].sharding == shardings["params"]["mlp"]["w"]
    assert_trees_equal(to_numpy(params), to_numpy(state["params"]))


def test_gs_paths_keep_their_scheme(tmp_path):
    assert str(ckpt.checkpoint_dir("gs://bucket/runs/a")) == "gs://bucket/runs/a/checkpoints"
    assert str(ckpt.as_path("gs://bucket/x") / "params") == "gs://bucket/x/params"
    rel = ckpt.as_path("some/dir")
    assert rel.is_absolute() and str(rel) == os.path.join(os.getcwd(), "some/dir")
    # a workdir given as a path object works like a string
    assert str(ckpt.checkpoint_dir(tmp_path)) == str(tmp_path / "checkpoints")


# ------------------------------------------------------------------------------------ main

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["loop", "restore"])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--hang-at", type=int, default=-1)
    ap.add_argument("--atomicity", default="auto")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--mesh", default="")
    a = ap.parse_args()
    {"loop": worker_loop, "restore": worker_restore}[a.mode](a)
