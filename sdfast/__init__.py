"""sdfast: a fast Stable Diffusion runtime.

    import sdfast
    pipe = sdfast.load("model.safetensors")        # LDM single file or diffusers folder
    images = pipe.generate("a red circle", steps=20, seed=1)
"""
from .errors import CheckpointError, SdfastError

__version__ = "0.1.0"
__all__ = ["load", "load_controlnet", "Control", "Pipeline", "SdfastError", "CheckpointError",
           "__version__"]


def _default_device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(path=None, device=None, dtype=None, prediction=None, backend="torch"):
    """Load a Stable Diffusion 1.x / 2.x model into a ready `Pipeline`.

    `path`: an LDM single file (.safetensors; .ckpt/.pt read with weights_only=True) or a
    diffusers folder; None loads sdfast's built-in model. `device` defaults to CUDA when present, else the CPU; `dtype` to float16
    on CUDA and float32 on the CPU. `prediction` ("eps" or "v") overrides detection.

    `backend="onnxruntime"` / `"tensorrt"` loads a folder written by `sdfast export onnx` /
    `sdfast export tensorrt` into the same Pipeline API (sdfast.export); the graphs' dtype is
    the one they were exported in.
    """
    import torch

    if backend != "torch":
        from .export.runtime import load_exported

        return load_exported(path, backend, device=device, dtype=dtype, prediction=prediction)

    from .builtin import resolve_model
    from .io.load import load_components
    from .pipeline import Pipeline

    path = resolve_model(path)
    device = _default_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = load_components(path, device=device, dtype=dtype, prediction=prediction)
    return Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.info, device, dtype,
                    source=parts.source, metadata=parts.metadata)


def load_controlnet(path, device=None, dtype=None):
    """Load a ControlNet (original `control_model.*` .pth/.safetensors, or a diffusers
    ControlNetModel folder/file) for `generate(control=[sdfast.Control(net, image)])`."""
    from .addons.controlnet import load_controlnet as _load

    return _load(path, device=device, dtype=dtype)


def __getattr__(name):
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    if name == "Control":
        from .addons.controlnet import Control
        return Control
    raise AttributeError(f"module 'sdfast' has no attribute {name!r}")
