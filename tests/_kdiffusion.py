"""Test helper: k-diffusion's `sampling.py` and `external.py`, loaded by file path.

The reference is Katherine Crowson's k-diffusion (PyPI `k-diffusion`, pinned below). Importing
the package pulls in torchvision and more, so only the two modules the tests need are loaded
straight from the wheel, inside a private package whose `utils` is a stub with the one helper
they use (`append_dims`). `sampling.py` also imports:
- `torchsde` (its Brownian tree): a test extra, `pip install torchsde`; the tests always pass a
  noise sampler, so the tree itself is never used;
- `torchdiffeq.odeint`, used only by `log_likelihood`, which the tests never call: that import
  line is replaced by a stub binding (the wheel's text is checked to contain it).

The wheel is fetched with `pip download --no-deps` into ~/.cache/sdfast-test/ the first time and
reused afterwards; the tests are skipped only when it is not cached and PyPI cannot be reached.
"""
import functools
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

VERSION = "0.1.1.post1"
CACHE = Path.home() / ".cache" / "sdfast-test"
PACKAGE = "_sdfast_test_kdiffusion"
_ODEINT_IMPORT = "from torchdiffeq import odeint\n"
_NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                   "Network is unreachable", "Connection refused", "ConnectTimeout", "ReadTimeout",
                   "Could not fetch URL", "ProxyError")


def _wheel():
    """Path of the cached k-diffusion wheel, downloading it on first use."""
    pattern = f"k_diffusion-{VERSION}-*.whl"
    found = sorted(CACHE.glob(pattern))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "20", "--retries", "1",
           "-d", str(CACHE), f"k-diffusion=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(CACHE.glob(pattern))
    if proc.returncode == 0 and found:
        return found[0]
    output = proc.stdout + proc.stderr
    if any(marker in output for marker in _NETWORK_ERRORS):
        pytest.skip(f"k-diffusion {VERSION} is not in {CACHE} and PyPI is unreachable")
    raise RuntimeError(f"could not download k-diffusion {VERSION}:\n{output[-2000:]}")


def _stub_utils():
    utils = types.ModuleType(f"{PACKAGE}.utils")

    def append_dims(x, target_dims):
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    return utils


def _exec_module(name, source, filename):
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__package__ = PACKAGE
    module.__file__ = filename
    sys.modules[module.__name__] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    setattr(sys.modules[PACKAGE], name, module)
    return module


@functools.lru_cache(maxsize=None)
def load_kdiffusion():
    """A namespace with k-diffusion's `sampling` and `external` modules."""
    try:
        import torchsde  # noqa: F401  (imported at the top of k-diffusion's sampling.py)
    except ImportError as exc:
        raise ImportError("the k-diffusion reference needs the test extra torchsde: "
                          "pip install torchsde") from exc
    wheel = _wheel()
    with zipfile.ZipFile(wheel) as zf:
        sources = {name: zf.read(f"k_diffusion/{name}.py").decode() for name in ("sampling", "external")}
    if _ODEINT_IMPORT not in sources["sampling"]:
        raise RuntimeError("k-diffusion's sampling.py no longer imports torchdiffeq as expected")
    sources["sampling"] = sources["sampling"].replace(
        _ODEINT_IMPORT, "odeint = None  # torchdiffeq stub: only log_likelihood uses it\n")
    package = types.ModuleType(PACKAGE)
    package.__path__ = []
    sys.modules[PACKAGE] = package
    utils = _stub_utils()
    sys.modules[utils.__name__] = utils
    package.utils = utils
    for name in ("sampling", "external"):  # external imports sampling
        _exec_module(name, sources[name], f"{wheel}/k_diffusion/{name}.py")
    return types.SimpleNamespace(sampling=package.sampling, external=package.external, wheel=wheel)


@pytest.fixture(scope="session")
def kdiff():
    return load_kdiffusion()
