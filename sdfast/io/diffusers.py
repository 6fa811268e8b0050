"""Reading a diffusers folder (model_index.json, unet/, vae/, text_encoder/) as LDM keys.

Each component's weights go through its one key map (diffusers_unet, diffusers_clip), so the
rest of sdfast sees exactly what a single-file checkpoint would give.
"""
import json
import os

from ..errors import CheckpointError
from .checkpoint import read_checkpoint
from .detect import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                     "pytorch_model.fp16.bin"),
}

# Marker stored in the metadata of a converted SD2 text encoder: diffusers keeps only the 23
# layers SD2 uses, so none is skipped (native LDM files hold 24 and skip the last).
TEXT_SKIP_KEY = "sdfast.text_skip_last_layers"


def is_diffusers_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the diffusers folder") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _read_component(folder, name):
    sub = os.path.join(folder, name)
    for filename in _WEIGHT_NAMES[name]:
        path = os.path.join(sub, filename)
        if os.path.isfile(path):
            tensors, _ = read_checkpoint(path)
            return tensors
    raise CheckpointError(f"{sub}: no weights found (looked for "
                          f"{', '.join(_WEIGHT_NAMES[name])})")


def read_diffusers_folder(folder):
    """Return `(ldm_state_dict, metadata)` for a diffusers Stable Diffusion folder."""
    from .diffusers_clip import clip_diffusers_to_ldm, openclip_diffusers_to_ldm
    from .diffusers_unet import unet_diffusers_to_ldm, vae_diffusers_to_ldm

    index = _read_json(os.path.join(folder, "model_index.json"))
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in index]
    if missing:
        raise CheckpointError(f"{folder}: model_index.json names no {', '.join(missing)}")
    if "text_encoder_2" in index:
        raise CheckpointError(f"{folder}: SDXL pipelines are not supported yet "
                              "(found text_encoder_2); use an SD1.x or SD2.x model")
    te_config = _read_json(os.path.join(folder, "text_encoder", "config.json"))
    unet_config = _read_json(os.path.join(folder, "unet", "config.json"))
    sd2 = te_config.get("hidden_act") == "gelu" or te_config.get("hidden_size") == 1024

    ldm = {}
    for key, value in unet_diffusers_to_ldm(_read_component(folder, "unet"), unet_config).items():
        ldm[UNET_PREFIX + key] = value
    for key, value in vae_diffusers_to_ldm(_read_component(folder, "vae")).items():
        ldm[VAE_PREFIX + key] = value
    text = _read_component(folder, "text_encoder")
    if sd2:
        for key, value in openclip_diffusers_to_ldm(text).items():
            ldm[OPENCLIP_PREFIX + key] = value
    else:
        for key, value in clip_diffusers_to_ldm(text).items():
            ldm[CLIP_PREFIX + key] = value

    metadata = {}
    if sd2:
        metadata[TEXT_SKIP_KEY] = "0"
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_path):
        prediction = _read_json(sched_path).get("prediction_type")
        if prediction == "v_prediction":
            metadata["sdfast.prediction"] = "v"
        elif prediction == "epsilon":
            metadata["sdfast.prediction"] = "eps"
    return ldm, metadata
