"""Reading checkpoint files: safetensors (mmap, lazy) and pickles (`torch.load(weights_only=True)`).

Nothing here runs code from a file. A pickle whose loading needs anything beyond tensors,
containers and a short list of inert globals is refused with `CheckpointError`.
"""
import os
import pickle
import zipfile

import torch

from ..errors import CheckpointError

SAFETENSORS_EXTS = (".safetensors", ".sft")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")

REFUSED_PICKLE = "refused: this file runs code when loaded; convert it to safetensors"


class _InertStub:
    """Stands in for harmless globals that old training checkpoints pickle alongside the
    weights (PyTorch Lightning's ModelCheckpoint callback state). It only stores state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


# Globals seen in real SD1.x .ckpt files that carry no code we would run.
_INERT_GLOBALS = [
    (_InertStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _safe_globals():
    import numpy as np

    allowed = list(_INERT_GLOBALS)
    # numpy scalars (e.g. `global_step` stored as a numpy int) rebuild through these.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed += [scalar, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("int64", "int32", "float64", "float32")]
    return allowed


def read_safetensors(path):
    """Return `(tensors, metadata)`: a dict of lazily mmapped CPU tensors and the header's
    `__metadata__` dict. No tensor data is read until it is used."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, dict(handle.metadata() or {})


def read_pickle(path):
    """Load a pickled checkpoint with torch's weights-only unpickler (memory-mapped when the
    file is in torch's zip format). Returns `(tensors, {})`."""
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "unsupported global" in text or "not an allowed global" in text:
            raise CheckpointError(f"{path}: {REFUSED_PICKLE}") from None
        if not mmap:
            with open(path, "rb") as fh:
                if fh.read(1) != b"\x80":   # every pickle since protocol 2 starts so
                    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors, a "
                                          "torch zip file nor a pickle)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    return _flatten_state_dict(obj, path), {}


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _flatten_state_dict(obj, path):
    """Training checkpoints nest the weights under `state_dict`; plain ones are the dict."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the checkpoint")
    return tensors


def read_checkpoint(path):
    """Read any supported single file: `(tensors, metadata)`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXTS):
        return read_safetensors(path)
    if lower.endswith(PICKLE_EXTS):
        return read_pickle(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return read_pickle(path)
    return read_safetensors(path)
