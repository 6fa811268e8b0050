"""The one detector for model families: which Stable Diffusion a state dict holds.

Works on LDM single-file keys (diffusers folders are converted to these keys first).
"""
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."      # SD1: OpenAI CLIP ViT-L/14, HF naming
OPENCLIP_PREFIX = "cond_stage_model.model."        # SD2: OpenCLIP ViT-H/14

# Heuristic from ComfyUI's SD2 model detection: v-prediction SD2 checkpoints have a much
# wider spread in this norm's bias than eps ones. Used only when nothing explicit says.
_V_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_PROBE_STD = 0.09

PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class ModelInfo:
    family: str          # "sd1" | "sd2"
    prediction: str      # "eps" | "v"
    inpaint: bool        # 9-channel UNet input (latent + mask + masked-image latent)
    prediction_source: str = "default"   # how `prediction` was decided

    def as_dict(self):
        return {"family": self.family, "prediction": self.prediction, "inpaint": self.inpaint}


def _has_prefix(keys, prefix):
    return any(k.startswith(prefix) for k in keys)


def _describe(keys):
    """A short summary of what a state dict holds, for error messages."""
    prefixes = sorted({k.split(".", 1)[0] for k in keys})
    shown = ", ".join(prefixes[:6]) + (", ..." if len(prefixes) > 6 else "")
    return f"{len(keys)} tensors, top-level prefixes: {shown or 'none'}"


def _explicit_prediction(sd, metadata):
    """An explicit marker in the file: our metadata, the ModelSpec field, or a `v_pred` key."""
    for key in ("sdfast.prediction", "modelspec.prediction_type", "prediction_type"):
        value = (metadata or {}).get(key)
        if value:
            value = str(value).lower()
            if value in ("v", "v_prediction", "v-prediction"):
                return "v", f"metadata {key}"
            if value in ("eps", "epsilon"):
                return "eps", f"metadata {key}"
    if "v_pred" in sd:
        return "v", "v_pred key"
    return None, None


def detect(sd, metadata=None, prediction=None):
    """Classify an LDM-keyed state dict. Raises `CheckpointError` for SDXL and for anything
    that is not an SD1.x/SD2.x model, saying what was found."""
    keys = list(sd.keys())
    if _has_prefix(keys, "conditioner.embedders.") or UNET_PREFIX + "label_emb.0.0.weight" in sd:
        raise CheckpointError("SDXL checkpoints are not supported yet (found SDXL "
                              "conditioner/label_emb keys); use an SD1.x or SD2.x checkpoint")
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(f"unrecognised checkpoint: no Stable Diffusion UNet found "
                              f"({_describe(keys)})")
    if _has_prefix(keys, OPENCLIP_PREFIX + "transformer.resblocks."):
        family = "sd2"
    elif _has_prefix(keys, CLIP_PREFIX):
        family = "sd1"
    else:
        raise CheckpointError(f"unrecognised checkpoint: UNet found but no SD1 (CLIP) or SD2 "
                              f"(OpenCLIP) text encoder ({_describe(keys)})")
    if not _has_prefix(keys, VAE_PREFIX):
        raise CheckpointError(f"unrecognised checkpoint: no VAE ({VAE_PREFIX}*) keys "
                              f"({_describe(keys)})")
    inpaint = conv_in.shape[1] == 9

    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise CheckpointError(f"unknown prediction {prediction!r}; use one of "
                                  f"{', '.join(PREDICTIONS)}")
        source = "argument"
    else:
        prediction, source = _explicit_prediction(sd, metadata)
    if prediction is None:
        prediction, source = "eps", "default"
        probe = sd.get(_V_PROBE_KEY)
        if family == "sd2" and not inpaint and probe is not None:
            if torch.std(probe.float(), unbiased=False).item() > _V_PROBE_STD:
                prediction, source = "v", "norm-statistics heuristic (SD2)"
    return ModelInfo(family=family, prediction=prediction, inpaint=inpaint,
                     prediction_source=source)


def split_components(sd, family):
    """The UNet, VAE and text-encoder sub-dicts of an LDM state dict, prefixes stripped.

    Shares tensors with `sd` (no copies). Older SD1 files store the CLIP tower without the
    `text_model.` level; it is added here so one model class serves both.
    """
    unet, vae, text = {}, {}, {}
    text_prefix = OPENCLIP_PREFIX if family == "sd2" else CLIP_PREFIX
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(text_prefix):
            sub = key[len(text_prefix):]
            if family == "sd1":
                if sub.endswith("position_ids"):
                    continue
                if not sub.startswith("text_model."):
                    sub = "text_model." + sub
            text[sub] = value
    return unet, vae, text
