"""`manifest.json`: what an export folder holds, read by every exported backend.

One JSON file beside the graphs (ONNX) or engines (TensorRT):

    format        "sdfast-onnx" | "sdfast-tensorrt";  version 1
    family, prediction, inpaint, vae_scale, native_size, metadata (the source's string metadata),
    source, model_hash (A1111's hash of the source file), dtype ("fp32" | "fp16"), opset
    configs       {"unet", "vae", "text_encoder", "text_encoder_class"}: sdfast's model configs
    graphs        {stage: {"file", "inputs": {name: {"shape", "dtype"}}, "outputs": {...},
                   "refit": {parameter name: initializer name}}}
    controlnets   {name: {"file", "config", "source", "inputs", "outputs"}}
    residuals     [[channels, downsamplings], ...]: the ControlNet residual inputs of the UNet

Shapes use symbolic names for dynamic axes. `refit` maps the torch parameters a LoRA can change
to the graph's initializers (sdfast.export.refit).
"""
import dataclasses
import json
import os

from ..errors import SdfastError
from ..io import save

MANIFEST = "manifest.json"
VERSION = 1
FORMATS = ("sdfast-onnx", "sdfast-tensorrt")


def config_dict(config):
    """A model config dataclass as JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def unet_config(data):
    from ..models.unet import UNetConfig

    return UNetConfig(**data)


def vae_config(data):
    from ..models.vae import VAEConfig

    return VAEConfig(**data)


def controlnet_config(data):
    from ..models.controlnet import ControlNetConfig

    return ControlNetConfig(unet_config(data["unet"]), data["hint_channels"])


def text_config(manifest):
    from ..io.load import text_encoder_class

    cls, config_cls = text_encoder_class(manifest["family"])
    return cls, config_cls(**manifest["configs"]["text_encoder"])


def write(folder, manifest):
    """Write `folder/manifest.json` atomically (a temporary file beside it, then `os.replace`):
    a stopped write leaves the previous manifest, or none, never half of one."""
    path = os.path.join(folder, MANIFEST)
    return save.write_atomic(path, save.text_writer(json.dumps(manifest, indent=1, sort_keys=True)),
                             overwrite=True)


def check_folder(path, what="-o"):
    """Refuse, before any work, an output folder that cannot be used (io.save.check_folder)."""
    save.check_folder(path, what)


def make_folder(path, what="-o"):
    """`os.makedirs(path, exist_ok=True)`, an OSError as a one-line SdfastError."""
    save.make_folder(path, what)


def read(folder, expected):
    """The manifest of an export folder; raises SdfastError when it is missing, of another
    format (`expected`), or of another version."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    if not os.path.isfile(path):
        raise SdfastError(f"{folder}: no {MANIFEST} (not a folder written by sdfast export)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SdfastError(f"{path}: unreadable manifest ({exc})") from None
    kind = manifest.get("format")
    if kind != expected:
        hint = {"sdfast-onnx": " (load it with backend='onnxruntime')",
                "sdfast-tensorrt": " (load it with backend='tensorrt')"}.get(kind, "")
        raise SdfastError(f"{folder}: a {kind or 'unknown'} export, not {expected}{hint}")
    if manifest.get("version") != VERSION:
        raise SdfastError(f"{path}: manifest version {manifest.get('version')} (this sdfast reads "
                          f"version {VERSION}); export again")
    return manifest


__all__ = ["MANIFEST", "VERSION", "config_dict", "unet_config", "vae_config",
           "controlnet_config", "text_config", "write", "read", "check_folder", "make_folder"]
