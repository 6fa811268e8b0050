"""sdfast: a fast Stable Diffusion runtime.

    import sdfast
    pipe = sdfast.load("model.safetensors")        # LDM single file or diffusers folder
    images = pipe.generate("a red circle", steps=20, seed=1)
"""
from .errors import CheckpointError, SdfastError

__version__ = "0.1.0"
__all__ = ["load", "load_controlnet", "accelerate", "Control", "Pipeline", "SdfastError",
           "CheckpointError", "__version__"]


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _available(kind):
    """Whether torch can use a device of type `kind` here (cpu always can)."""
    import torch

    if kind == "cpu":
        return True
    if kind == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, kind, None)
    return bool(backend is not None and backend.is_available())


def check_device(device, what="device"):
    """`device` (a string such as "cpu", "cuda", "cuda:1", or a torch.device) as a torch.device
    this machine has; otherwise SdfastError, one line naming it (`what`: how the message calls
    it, e.g. "--device"). None: CUDA when present, else the CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SdfastError(f"{what} {device}: not a device (valid: cpu, cuda, cuda:N, mps, "
                          "xpu)") from None
    if parsed.type not in DEVICE_TYPES:
        raise SdfastError(f"{what} {device}: sdfast does not run on {parsed.type!r} devices "
                          "(valid: cpu, cuda, cuda:N, mps, xpu)")
    if not _available(parsed.type):
        name = "CUDA" if parsed.type == "cuda" else parsed.type.upper()
        raise SdfastError(f"{what} {device}: no {name} device is available here")
    if parsed.type != "cpu" and parsed.index is not None:
        count = getattr(torch, parsed.type).device_count() if parsed.type != "mps" else 1
        if parsed.index >= count:
            raise SdfastError(f"{what} {device}: device index out of range ({count} "
                              f"{parsed.type} device(s) here: {parsed.type}:0 to "
                              f"{parsed.type}:{count - 1})")
    return parsed


def load(path=None, device=None, dtype=None, prediction=None, backend="torch",
         channels_last=False):
    """Load a Stable Diffusion 1.x / 2.x model into a ready `Pipeline`.

    `path`: an LDM single file (.safetensors; .ckpt/.pt read with weights_only=True) or a
    diffusers folder; None loads sdfast's built-in model. `device` defaults to CUDA when
    present, else the CPU; `dtype` (a torch dtype or "fp32", "fp16", "bf16") to float16 on CUDA
    and float32 on the CPU. `prediction` ("eps" or "v") overrides detection. `channels_last`
    stores the UNet's and VAE's 4-D weights channels-last, so their convolutions run NHWC (the
    faster layout for fp16/bf16 tensor cores).

    `backend="onnxruntime"` / `"tensorrt"` loads a folder written by `sdfast export onnx` /
    `sdfast export tensorrt` into the same Pipeline API (sdfast.export); the graphs' dtype is
    the one they were exported in.
    """
    import torch

    dtype = parse_dtype(dtype)
    if backend != "torch":
        if channels_last:
            raise SdfastError(f"channels_last applies to the torch backend, not {backend!r}")
        from .export.runtime import load_exported

        return load_exported(path, backend, device=device, dtype=dtype, prediction=prediction)

    from .builtin import resolve_model
    from .io.load import load_components
    from .pipeline import Pipeline

    path = resolve_model(path)
    device = check_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = load_components(path, device=device, dtype=dtype, prediction=prediction)
    if channels_last:
        for module in (parts.unet, parts.vae):
            module.to(memory_format=torch.channels_last)
    return Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.info, device, dtype,
                    source=parts.source, metadata=parts.metadata)


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def parse_dtype(dtype):
    """None, a floating torch dtype, or one of `DTYPES`' names -> None or a torch dtype."""
    import torch

    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return getattr(torch, DTYPES[dtype.lower()])
    raise SdfastError(f"unknown dtype {dtype!r}; valid: fp32, fp16, bf16 (or a torch float dtype)")


def load_controlnet(path, device=None, dtype=None):
    """Load a ControlNet (original `control_model.*` .pth/.safetensors, or a diffusers
    ControlNetModel folder/file) for `generate(control=[sdfast.Control(net, image)])`."""
    from .addons.controlnet import load_controlnet as _load

    return _load(path, device=device, dtype=parse_dtype(dtype))


def accelerate(pipe, undo=False):
    """Swap sdfast's fused ops into a diffusers pipeline or model, in place (only its instances
    change; diffusers itself is not patched). Returns a handle with `.counts` and `.undo()`;
    `undo=True` reverses an earlier call. See `sdfast.accelerate_diffusers`."""
    from .accelerate_diffusers import accelerate as _accelerate

    return _accelerate(pipe, undo=undo)


def __getattr__(name):
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    if name == "Control":
        from .addons.controlnet import Control
        return Control
    raise AttributeError(f"module 'sdfast' has no attribute {name!r}")
