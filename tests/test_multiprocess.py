"""Two processes x 2 CPU devices joined by jax.distributed (gloo) == one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax

from test_train import run_steps, tiny_config

TESTS_DIR = os.path.dirname(__file__)
REPO = os.path.dirname(TESTS_DIR)
MESH = {"data": 2, "fsdp": 2}

WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    sys.path[:0] = [{tests!r}, {repo!r}]
    from test_train import run_steps, tiny_config
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    metrics, params = run_steps(tiny_config(**{mesh!r}), None, 3)
    if jax.process_index() == 0:
        flat = {{jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(params)}}
        np.savez(sys.argv[3], **flat)
        with open(sys.argv[3] + ".json", "w") as f:
            json.dump(metrics, f)
    jax.distributed.shutdown()
""").format(tests=TESTS_DIR, repo=REPO, mesh=MESH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    out = str(tmp_path / "mp.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    addr = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, addr, str(i), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    metrics, params = run_steps(tiny_config(**MESH), jax.devices()[:4], 3)
    with open(out + ".json") as f:
        mp_metrics = json.load(f)
    for key in ("loss", "grad_norm", "sft_loss", "acc", "uncond_count"):
        np.testing.assert_allclose([m[key] for m in mp_metrics], [m[key] for m in metrics],
                                   rtol=1e-5, err_msg=key)
    with np.load(out) as z:
        flat = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(params)}
        assert set(z.files) == set(flat)
        for k, v in flat.items():
            np.testing.assert_allclose(z[k], v, rtol=0, atol=1e-5 * np.max(np.abs(v)), err_msg=k)
