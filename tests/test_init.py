"""cca_jax/__init__.py: the default XLA:CPU flag (convolutions kept out of YNNPACK)."""

import os
import subprocess
import sys

import jaxlib.version

import cca_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags_after_import(xla_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", "import os, cca_jax; print(os.environ.get('XLA_FLAGS', ''))"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cpu_conv_flag_added_and_user_setting_wins():
    if not jaxlib.version.__version__.startswith("0.10."):
        assert _flags_after_import(None) == ""  # never pass a flag an unknown jaxlib may reject
        return
    assert _flags_after_import(None) == cca_jax._CPU_XLA_FLAG
    assert _flags_after_import("--xla_force_host_platform_device_count=2") == \
        f"--xla_force_host_platform_device_count=2 {cca_jax._CPU_XLA_FLAG}"
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert _flags_after_import(mine) == mine


def test_flag_reaches_the_cpu_compiler():
    import jax
    import jax.numpy as jnp

    if not jaxlib.version.__version__.startswith("0.10."):
        return  # jaxlib outside the measured line: nothing was set (first test)
    assert cca_jax._CPU_XLA_FLAG in os.environ["XLA_FLAGS"]
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = conv.lower(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).compile().as_text()
    assert "ynn_fusion" not in hlo and "convolution" in hlo
