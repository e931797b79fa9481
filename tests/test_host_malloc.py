"""Host malloc settings of the CPU entry points: when they apply, the re-exec, and their effect."""

import os
import subprocess
import sys
import textwrap

from cca_jax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**extra):
    # one CPU device (not the suite's 8 fake ones), which settles its heap in one execution
    env = {k: v for k, v in os.environ.items()
           if k not in host_malloc.TUNED_ENV and k not in (host_malloc.OPT_OUT, "XLA_FLAGS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_when_the_settings_apply():
    base = {"JAX_PLATFORMS": "cpu"}
    assert host_malloc.wanted(base)
    assert not host_malloc.wanted({**base, host_malloc.OPT_OUT: "1"})  # opt-out
    assert not host_malloc.wanted({**base, "MALLOC_ARENA_MAX": "4"})  # the user's own choice wins
    assert not host_malloc.wanted({"JAX_PLATFORMS": "tpu"})
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cuda,cpu"})
    assert "kept" in host_malloc.describe(host_malloc.TUNED_ENV)
    assert "glibc defaults" in host_malloc.describe({})


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_clean_env(**env),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_entry_point_reexecutes_once_with_the_settings():
    code = """
        import os
        from cca_jax import host_malloc
        print("start")
        host_malloc.reexec_if_wanted()
        print(os.environ.get("MALLOC_MMAP_MAX_"), os.environ.get("MALLOC_ARENA_MAX"))
    """
    assert _run(code, JAX_PLATFORMS="cpu") == ["start", "start", "0", "1"]
    assert _run(code, JAX_PLATFORMS="cpu", CCA_JAX_DEFAULT_MALLOC="1") == ["start", "None", "None"]


def test_kept_memory_stops_the_per_execution_page_faults():
    """With glibc's defaults every execution of a program with large temporaries page-faults
    them in again (mmap/munmap); with the settings only the first one does."""
    # 64 MB temporaries: above glibc's largest mmap threshold (32 MB), so always mmap'd by default
    code = """
        import resource, jax, jax.numpy as jnp
        g = jax.jit(lambda x: (jnp.sin(x).T @ jnp.ones((x.shape[0], 8))).sum() + jnp.cos(x).T.sum())
        x = jnp.ones((4096, 4096))
        for _ in range(12):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            jax.block_until_ready(g(x))
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    """
    # the last six executions; the kept heap still grows now and then (fragmentation) until it
    # settles, so most of them, not all, are free of faults
    default = [int(n) for n in _run(code, JAX_PLATFORMS="cpu")[-6:]]
    kept = [int(n) for n in _run(code, JAX_PLATFORMS="cpu", **host_malloc.TUNED_ENV)[-6:]]
    assert sum(n < 500 for n in kept) >= 4, kept
    assert min(default) > 10_000, default  # 64 MB = 16k pages faulted in again every time
