"""convert/torch_zip.py: official .pt/.pth files read without PyTorch and without running code."""

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from cca_jax.convert import common, torch_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_float(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.name in ("bfloat16", "float16") else x


def _tensors():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return collections.OrderedDict(
        dense=torch.randn(3, 4), cols=base[:, 2:5], transposed=base.t(), row=base[2],
        half=torch.randn(5).half(), bf16=torch.randn(4, 3).bfloat16(), double=torch.randn(2, 2).double(),
        scalar=torch.tensor(3.5), long=torch.arange(7), int8=torch.arange(-3, 3, dtype=torch.int8),
        mask=torch.tensor([True, False]), empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, 2)), expanded=torch.randn(3, 1).expand(3, 4))


def test_matches_torch_load_for_every_dtype_and_layout(tmp_path):
    sd = _tensors()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0), "epoch": 3, "extra": [torch.ones(2)]}, path)
    got = torch_zip.load(path)
    assert set(got["model"]) == set(sd) and got["epoch"] == 3
    assert isinstance(got["model"], collections.OrderedDict)
    assert isinstance(got["args"], torch_zip._Inert)  # never an argparse object rebuilt from the file
    np.testing.assert_array_equal(got["extra"][0], np.ones(2, np.float32))
    for k, v in sd.items():
        ref = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        out = _as_float(got["model"][k])
        assert out.shape == ref.shape, k
        np.testing.assert_array_equal(out, ref, err_msg=k)
    assert got["model"]["bf16"].dtype.name == "bfloat16" and got["model"]["half"].dtype == np.float16
    got["model"]["cols"][0, 0] = -1.0  # views of one storage come back as independent arrays
    assert got["model"]["transposed"][2, 0] == 2.0


def test_state_dict_loader_works_without_torch(tmp_path):
    sd = collections.OrderedDict(w=torch.randn(4, 3), b=torch.randn(3).bfloat16())
    torch.save({"model": sd}, tmp_path / "c2i.pt")
    torch.save({"model": sd}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from cca_jax.convert import common\n"
            f"sd = common.load_official_state_dict({str(tmp_path / 'c2i.pt')!r})\n"
            f"np.savez({str(tmp_path / 'out.npz')!r}, **sd)\n"
            "try:\n"
            f"    common.load_official_state_dict({str(tmp_path / 'legacy.pt')!r})\n"
            "except RuntimeError as e:\n"
            "    assert 'pip install torch' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('legacy file read without torch')\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["w"], sd["w"].numpy())
    assert out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["b"], sd["b"].float().numpy())


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    got = torch_zip.load(path)
    assert isinstance(got["w"], torch_zip._Inert) and not marker.exists()


def test_truncated_storage_and_other_formats(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(8, 8)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    bad = tmp_path / "truncated.pt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data[: len(data) // 2] if "/data/" in n else data)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        torch_zip.load(bad)

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(torch_zip.UnsupportedTorchFile):
        torch_zip.load(legacy)
    np.testing.assert_array_equal(common.load_official_state_dict(legacy)["w"], np.ones((2, 2)))  # via torch
    with pytest.raises(torch_zip.UnsupportedTorchFile, match="data.pkl"):
        with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
            z.writestr("readme.txt", "hi")
        torch_zip.load(tmp_path / "other.zip")
    torch_zip.load(io.BytesIO(path.read_bytes()))  # file objects (gs:// bytes) work too
