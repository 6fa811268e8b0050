"""Key maps between diffusers/transformers text encoders and LDM (single-file) text encoder keys.

The LDM names are those of `sdfast.models.clip`:
- SD1 (`CLIPTextModel`): keys after `cond_stage_model.transformer.`, i.e. transformers'
  `CLIPTextModel` names with the `text_model.` prefix. transformers >= 5 saves a `CLIPTextModel`
  without that prefix; diffusers folders written by older versions have it. Both are accepted.
- SD2 (`OpenCLIPTextModel`): keys after `cond_stage_model.model.`, open_clip's names. A diffusers
  SD2 `text_encoder` is a transformers `CLIPTextModel` with the first 23 of OpenCLIP ViT-H's 24
  blocks (diffusers' `convert_open_clip_checkpoint` drops block 23, see its
  `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`), so its output already is the penultimate layer: build the model for the converted weights with
  `OpenCLIPTextConfig.detect_from_weights(converted, skip_last_layers=0)`.

No tensor is copied except the q/k/v concatenation into `attn.in_proj_*` (SD2). `position_ids`
buffers are dropped. Any key that matches no rule raises a ValueError naming it.
"""
import re

import torch

__all__ = ["clip_diffusers_to_ldm", "clip_ldm_to_diffusers",
           "openclip_diffusers_to_ldm", "openclip_ldm_to_diffusers"]

_HF_PREFIX = "text_model."
_HF_POSITION_IDS = "embeddings.position_ids"
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
_HF_TOP = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
           "final_layer_norm.weight", "final_layer_norm.bias")

# HF CLIPTextModel name -> open_clip name; the q/k/v projections are handled apart (fused).
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight",
                 "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPENCLIP_LAYER_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OPENCLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def _raise_unmapped(unmapped, what):
    if unmapped:
        raise ValueError(f"{len(unmapped)} {what} key(s) have no mapping: {sorted(unmapped)}")


def _put(out, key, value):
    if key in out:
        raise ValueError(f"two source keys map to {key!r} (both with and without 'text_model.'?)")
    out[key] = value


def _strip_hf_prefix(key):
    return key[len(_HF_PREFIX):] if key.startswith(_HF_PREFIX) else key


def _is_hf_text_key(name):
    """Whether `name` (without `text_model.`) is a CLIPTextModel parameter name."""
    m = _HF_LAYER.fullmatch(name)
    return name in _HF_TOP or (m is not None and m.group(2) in _HF_LAYER_MODULES)


def clip_diffusers_to_ldm(sd):
    """SD1: a transformers/diffusers `CLIPTextModel` state dict (with or without the
    `text_model.` prefix) -> `sdfast.models.clip.CLIPTextModel` keys. Same tensors, renamed."""
    out, unmapped = {}, []
    for key, value in sd.items():
        name = _strip_hf_prefix(key)
        if name == _HF_POSITION_IDS:
            continue
        if _is_hf_text_key(name):
            _put(out, _HF_PREFIX + name, value)
        else:
            unmapped.append(key)
    _raise_unmapped(unmapped, "CLIP text encoder")
    return out


def clip_ldm_to_diffusers(sd):
    """SD1 inverse of `clip_diffusers_to_ldm`: keys keep the `text_model.` prefix, as in diffusers
    folders on disk (which transformers 4 and 5 both load)."""
    unmapped = [k for k in sd
                if not (k.startswith(_HF_PREFIX) and _is_hf_text_key(_strip_hf_prefix(k)))]
    _raise_unmapped(unmapped, "LDM CLIP text encoder")
    return dict(sd)


def _fuse_qkv(qkv):
    """`attn.in_proj_{weight,bias}` = cat(q, k, v) rows, as `torch.nn.MultiheadAttention` stores
    them. `qkv` maps (block, "weight" | "bias") to {HF module name: tensor}."""
    out, incomplete = {}, []
    for (block, kind), parts in sorted(qkv.items()):
        if len(parts) != 3:
            incomplete.append(f"encoder.layers.{block}.self_attn.*_proj.{kind}: {sorted(parts)}")
            continue
        out[f"transformer.resblocks.{block}.attn.in_proj_{kind}"] = torch.cat(
            [parts[m] for m in _QKV], dim=0)  # 3 x [W, W] -> [3W, W] (bias: 3 x [W] -> [3W])
    if incomplete:
        raise ValueError(f"incomplete q/k/v projections: {incomplete}")
    return out


def openclip_diffusers_to_ldm(sd):
    """SD2: a transformers/diffusers `CLIPTextModel` state dict (with or without `text_model.`;
    a `CLIPTextModelWithProjection`'s `text_projection.weight` [P, W] becomes `text_projection`
    [W, P], a transposed view) -> `sdfast.models.clip.OpenCLIPTextModel` keys.

    The layer count is kept (23 for diffusers SD2.x): use `skip_last_layers=0` with the result.
    """
    out, unmapped, qkv = {}, [], {}
    for key, value in sd.items():
        name = _strip_hf_prefix(key)
        m = _HF_LAYER.fullmatch(name)
        if name == _HF_POSITION_IDS:
            continue
        if key == "text_projection.weight":
            _put(out, "text_projection", value.t())  # [P, W] -> [W, P]
        elif name in _OPENCLIP_TOP:
            _put(out, _OPENCLIP_TOP[name], value)
        elif m and m.group(2) in _QKV:
            _put(qkv.setdefault((int(m.group(1)), m.group(3)), {}), m.group(2), value)
        elif m and m.group(2) in _OPENCLIP_LAYER:
            block, module, kind = m.groups()
            _put(out, f"transformer.resblocks.{block}.{_OPENCLIP_LAYER[module]}.{kind}", value)
        else:
            unmapped.append(key)
    _raise_unmapped(unmapped, "OpenCLIP text encoder (HF naming)")
    out.update(_fuse_qkv(qkv))
    return out


def openclip_ldm_to_diffusers(sd):
    """SD2 inverse of `openclip_diffusers_to_ldm` (q/k/v are views of `in_proj_*`; keys get the
    `text_model.` prefix; `text_projection` becomes `text_projection.weight`). A transformers text
    model has no `logit_scale`: drop it first. All blocks are kept: to match a diffusers SD2 folder,
    drop the last block of a native 24-block file first."""
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out, unmapped = {}, []
    for key, value in sd.items():
        m, fused = _OPENCLIP_LAYER_RE.fullmatch(key), _OPENCLIP_IN_PROJ.fullmatch(key)
        if key in top:
            out[_HF_PREFIX + top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()  # [W, P] -> [P, W]
        elif fused:
            block, kind = fused.groups()
            for module, part in zip(_QKV, value.chunk(3, dim=0)):  # [3W, W] -> 3 x [W, W]
                out[f"{_HF_PREFIX}encoder.layers.{block}.{module}.{kind}"] = part
        elif m and m.group(2) in layer:
            out[f"{_HF_PREFIX}encoder.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
        else:
            unmapped.append(key)
    _raise_unmapped(unmapped, "LDM OpenCLIP text encoder")
    return out
