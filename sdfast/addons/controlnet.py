"""ControlNets at inference: loading (original `control_model.*` files, .pth/.safetensors, and
diffusers ControlNetModel folders or single files) and `Control`, what `generate` takes.

Timing follows ComfyUI's `start_percent` / `end_percent`: a control acts while the sampling
timestep t (0..999) satisfies `(1 - end) * 999 <= t <= (1 - start) * 999`, where 0% means
before the first step and 100% after the last: start=0, end=1 is every step, start=1 none. Several controls add their residuals, each times its strength. Modes (A1111's control modes):
"balanced" applies them to the conditional and unconditional halves alike (diffusers' and
ComfyUI's default); "prompt" ("my prompt is more important") scales residual i of n by
0.825^(n-1-i) (soft injection: the deepest, middle-block residual keeps full strength);
"controlnet" ("ControlNet is more important") is that soft injection on the conditional half
only, so classifier-free guidance pushes towards the control.
"""
import json
import math
import os
from dataclasses import dataclass

import torch

from sdfast.errors import CheckpointError, SdfastError

_PREFIX = "control_model."
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def _read(path):
    """`(cldm state dict without prefix, metadata)` of any supported ControlNet file/folder."""
    from sdfast.io.checkpoint import read_checkpoint
    from sdfast.io.diffusers_unet import controlnet_diffusers_to_ldm

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SdfastError(f"{path}: no such ControlNet file or folder")
    config = None
    if os.path.isdir(path):
        found = [f for f in _DIFFUSERS_FILES if os.path.isfile(os.path.join(path, f))]
        if not found or not os.path.isfile(os.path.join(path, "config.json")):
            raise SdfastError(f"{path}: not a diffusers ControlNet folder (config.json and "
                              "diffusion_pytorch_model.* expected)")
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (ValueError, OSError) as exc:         # JSONDecodeError, UnicodeDecodeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SdfastError(f"{config_path}: not a readable JSON file ({reason})") from None
        if not isinstance(config, dict):
            raise SdfastError(f"{config_path}: expected a JSON object (a diffusers "
                              "ControlNet config)")
        sd, metadata = read_checkpoint(os.path.join(path, found[0]))
    else:
        sd, metadata = read_checkpoint(path)
    if any(k.startswith(_PREFIX) for k in sd):
        sd = {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)}
    elif "controlnet_cond_embedding.conv_in.weight" in sd:
        try:
            sd = controlnet_diffusers_to_ldm(sd, config)
        except ValueError as exc:
            raise SdfastError(f"{path}: {exc}") from None
    if "input_hint_block.0.weight" not in sd:
        if any(k.startswith(("zero_convs.", "middle_block_out.")) for k in sd):  # ControlNet's own
            raise SdfastError(f"{path}: a ControlNet without its hint encoder (no "
                              "input_hint_block.0.weight): the file is incomplete")
        if any(k.startswith(("model.diffusion_model.", "lora_", "down_blocks.")) for k in sd):
            raise SdfastError(f"{path}: this is not a ControlNet (no input_hint_block / "
                              "controlnet_cond_embedding weights)")
        raise SdfastError(f"{path}: not a ControlNet file (no control_model.* or "
                          "controlnet_cond_embedding.* keys)")
    return sd, dict(metadata or {})


def load_controlnet(path, device=None, dtype=None):
    """Load a ControlNet for SD1.x or SD2.x. Returns a `ControlNetModel` (eval, frozen) with
    `.source`; `device`/`dtype` default as in `sdfast.load`."""
    from sdfast import check_device
    from sdfast.io.load import build_module, unet_heads
    from sdfast.models.controlnet import ControlNetConfig, ControlNetModel

    sd, metadata = _read(path)
    device = check_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        config = ControlNetConfig.detect_from_weights(sd, **unet_heads(metadata))
        model = build_module(ControlNetModel, config, sd, device, dtype, "ControlNet")
    except (KeyError, IndexError, ValueError, CheckpointError) as exc:
        raise SdfastError(f"{os.fspath(path)}: unrecognised ControlNet layout ({exc})") from None
    model.source = os.fspath(path)
    return model


@dataclass
class Control:
    """One ControlNet applied in `generate(control=[...])`: the net, its conditioning image
    (a path, PIL image, or `[1|B, 3, H, W]` tensor in 0..1, resized to the output size),
    `strength`, and the fraction of sampling it acts on (`start`..`end`, ComfyUI's percents)."""

    controlnet: object
    image: object
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"


MODES = ("balanced", "prompt", "controlnet")
SOFT_INJECTION = 0.825


def prepare_controls(controls, unet, width, height, device, dtype):
    """Check `controls` against the UNet and turn them into `ActiveControl`s."""
    from sdfast.images import prepare_image

    if controls is None:
        return []
    if isinstance(controls, Control):
        controls = [controls]
    out = []
    for c in controls:
        if not isinstance(c, Control):
            raise SdfastError(f"control must be sdfast.Control objects, got {type(c).__name__}")
        net = c.controlnet
        cfg = getattr(net, "config", None)
        if cfg is None or not hasattr(cfg, "unet"):
            raise SdfastError("Control.controlnet must come from sdfast.load_controlnet")
        if cfg.unet.context_dim != unet.config.context_dim:
            raise SdfastError(f"the ControlNet reads {cfg.unet.context_dim}-wide text but the model's "
                              f"is {unet.config.context_dim}-wide (a ControlNet for SD1.x on SD2.x, "
                              "or the reverse)")
        if (cfg.unet.model_channels, cfg.unet.channel_mult, cfg.unet.num_res_blocks) != (
                unet.config.model_channels, unet.config.channel_mult, unet.config.num_res_blocks):
            raise SdfastError("the ControlNet's encoder does not match this model's UNet "
                              "(another architecture)")
        if c.mode not in MODES:
            raise SdfastError(f"unknown control mode {c.mode!r}; modes: {', '.join(MODES)}")
        try:
            finite = math.isfinite(float(c.strength))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise SdfastError(f"control strength must be a finite number, got {c.strength!r}")
        if not 0.0 <= c.start <= c.end <= 1.0:
            raise SdfastError(f"control start/end must satisfy 0 <= start <= end <= 1, got "
                              f"{c.start}, {c.end}")
        if isinstance(c.image, torch.Tensor):
            hint = c.image.float()
            if hint.dim() == 3:
                hint = hint[None]
            if hint.dim() != 4 or hint.shape[1] != 3:
                raise SdfastError(f"a control image tensor must be [B, 3, H, W], got {tuple(hint.shape)}")
            hint = torch.nn.functional.interpolate(hint, size=(height, width), mode="bilinear")
        else:
            hint = (prepare_image(c.image, width, height) + 1) / 2       # [1, 3, H, W] in 0..1
        out.append(ActiveControl(net, hint.to(device, dtype), float(c.strength),
                                 _percent_to_t(c.end), _percent_to_t(c.start),
                                 c.mode))
    return out


def _percent_to_t(percent):
    """ComfyUI's `percent_to_sigma` in timesteps: 0% is before the first step (+inf) and 100%
    after the last (-inf), so start=1 never acts and end=1 acts to the end."""
    if percent <= 0.0:
        return float("inf")
    if percent >= 1.0:
        return float("-inf")
    return (1.0 - percent) * 999.0


@dataclass
class ActiveControl:
    net: object
    hint: torch.Tensor
    strength: float
    t_low: float
    t_high: float
    mode: str = "balanced"

    def residuals(self, x, timesteps, context, cond_rows=None):
        """Strength-scaled residuals, or None when this step is outside start..end.
        `cond_rows`: the leading rows of the batch that are conditional (mode "controlnet")."""
        t = float(timesteps.reshape(-1)[0])
        if not self.t_low - 1e-4 <= t <= self.t_high + 1e-4:
            return None
        hint = self.hint
        if hint.shape[0] != x.shape[0]:
            hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
        outs = self.net(x[:, :4], hint, timesteps, context)
        n = len(outs)
        scales = [self.strength] * n
        if self.mode != "balanced":
            scales = [s * SOFT_INJECTION ** (n - 1 - i) for i, s in enumerate(scales)]
        outs = [o * s if s != 1.0 else o for o, s in zip(outs, scales)]
        if self.mode == "controlnet" and cond_rows is not None and cond_rows < x.shape[0]:
            keep = torch.zeros(x.shape[0], 1, 1, 1, dtype=outs[0].dtype, device=outs[0].device)
            keep[:cond_rows] = 1
            outs = [o * keep for o in outs]
        return outs


__all__ = ["Control", "load_controlnet", "prepare_controls", "ActiveControl"]
