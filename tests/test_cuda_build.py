"""The CUDA extension sdfast._C_cuda (csrc/cuda) was built for sm_80 / sm_90 and links.

Without nvcc nothing is built and the tests skip. With nvcc, the module must exist; it must
import wherever the CUDA runtime library loads (no GPU or driver is needed for that), and
then expose the three kernels. Launching them needs a GPU: tests/gpu/test_gpu_kernels.py.
"""
import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

import sdfast

PKG = Path(sdfast.__file__).resolve().parent
HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def _module_path():
    found = sorted(PKG.glob("_C_cuda*.so")) + sorted(PKG.glob("_C_cuda*.pyd"))
    return found[0] if found else None


def test_cuda_module_built_when_nvcc_present():
    if not HAS_NVCC:
        pytest.skip("nvcc not found: sdfast._C_cuda is not built on this machine")
    path = _module_path()
    assert path is not None, (f"nvcc is present but {PKG}/_C_cuda*.so is missing: rebuild with "
                              "`pip install -e .` (CMake builds csrc/cuda when it finds nvcc)")


def test_cuda_module_targets_sm80_and_sm90():
    path = _module_path()
    if path is None:
        pytest.skip("sdfast._C_cuda is not built")
    data = path.read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert arch in data, f"{path.name} has no {arch.decode()} code"


def test_cuda_module_links_and_imports():
    path = _module_path()
    if path is None:
        pytest.skip("sdfast._C_cuda is not built")
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
        missing = [line.strip() for line in out.splitlines() if "not found" in line]
        if any("libcudart" in line for line in missing):
            pytest.skip(f"the CUDA runtime library cannot be loaded here: {missing}")
        assert not missing, f"unresolved libraries: {missing}"
    ext = importlib.import_module("sdfast._C_cuda")
    for name in ("group_norm", "attention", "lora_merge"):
        assert callable(getattr(ext, name))
    assert ext.MAX_HEAD_DIM >= 160


def test_cuda_backend_never_fails_to_import():
    from sdfast.ops import cuda_backend
    import torch
    assert isinstance(cuda_backend.available(), bool)
    if not torch.cuda.is_available():
        assert cuda_backend.available() is False
        reason = cuda_backend.supports_attention(*[torch.zeros(1, 1, 2, 8)] * 3)
        assert isinstance(reason, str) and reason
