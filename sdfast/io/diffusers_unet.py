"""Key maps from diffusers-folder state dicts to LDM (single-file) keys, UNet and VAE.

The one place that knows diffusers' names for `UNet2DConditionModel` and `AutoencoderKL`
(diffusers `models/unets/unet_2d_blocks.py`, `models/autoencoders/vae.py`); the LDM side is
the attribute layout of `sdfast.models.unet` / `sdfast.models.vae`. The block arithmetic mirrors
diffusers' own LDM conversion (`loaders/single_file_utils.py`), run the other way.

Pure renaming: the returned dict holds the same tensors (the VAE's linear attention
weights become `[C, C, 1, 1]` views). Any key that no rule maps raises, naming the keys.
"""
import re
from collections.abc import Mapping

from sdfast.models.layers import key_indices

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
# New (`to_q`, ...) and pre-0.14 (`query`, ...) diffusers names of the VAE mid-block attention.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
# Inside a Transformer2DModel / SpatialTransformer both formats use the same names.
_TRANSFORMER_PARAM = re.compile(
    r"(norm|proj_in|proj_out)\.(weight|bias)"
    r"|transformer_blocks\.\d+\.(norm[123]\.(weight|bias)|attn[12]\.to_[qkv]\.weight"
    r"|attn[12]\.to_out\.0\.(weight|bias)|ff\.net\.(0\.proj|2)\.(weight|bias))")


def _rename(sd, rules, what):
    """Apply the first matching `(regex, fn)` rule to each key; `fn(match)` gives the new key
    or None (matched the shape but not a known name). Raises on unmapped keys or collisions."""
    out, unmapped = {}, []
    for key, value in sd.items():
        new = None
        for pattern, fn in rules:
            m = pattern.fullmatch(key)
            if m:
                new = fn(m)
                break
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise ValueError(f"{what}: two diffusers keys map to {new!r} (the second is {key!r})")
        else:
            out[new] = value
    if unmapped:
        shown = ", ".join(unmapped[:20]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 20 else "")
        raise ValueError(f"{what}: diffusers keys with no LDM name: {shown}")
    return out


def _rules(table):
    return [(re.compile(p), fn) for p, fn in table]


def _unet_rules(nrb, attn_up):
    """Rules for a UNet with `nrb` res blocks per down level and attention in the up blocks
    `attn_up` (which moves the upsampler from index 1 to 2 of its output block)."""
    step = nrb + 1

    def block(first, i, j, count):
        """LDM block index of diffusers block `i`, layer `j` (None if `j` is out of range)."""
        return first + int(i) * step + int(j) if int(j) < count else None

    def res(prefix, name, param):
        ldm = _UNET_RESNET.get(name)
        return None if prefix is None or ldm is None else f"{prefix}.{ldm}.{param}"

    def attn(prefix, rest):
        return f"{prefix}.{rest}" if prefix and _TRANSFORMER_PARAM.fullmatch(rest) else None

    def at(which, index, sub):
        return None if index is None else f"{which}.{index}.{sub}"

    return _rules([
        (r"time_embedding\.linear_([12])\.(weight|bias)",
         lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"conv_in\.(weight|bias)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"conv_norm_out\.(weight|bias)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(weight|bias)", lambda m: f"out.2.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: res(at("input_blocks", block(1, m[1], m[2], nrb), 0), m[3], m[4])),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: attn(at("input_blocks", block(1, m[1], m[2], nrb), 1), m[3])),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)",
         lambda m: res(f"middle_block.{2 * int(m[1])}", m[2], m[3])),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: attn("middle_block.1", m[1])),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: res(at("output_blocks", block(0, m[1], m[2], step), 0), m[3], m[4])),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: attn(at("output_blocks", block(0, m[1], m[2], step), 1), m[3])),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)",
         lambda m: f"output_blocks.{int(m[1]) * step + nrb}.{2 if int(m[1]) in attn_up else 1}"
                   f".conv.{m[2]}"),
    ])


def unet_diffusers_to_ldm(sd, config=None):
    """Rename a diffusers `UNet2DConditionModel` state dict to LDM UNet keys (no prefix).

    `config` gives the res blocks per level and which up blocks hold attention: a `UNetConfig`,
    or a diffusers `unet/config.json` dict (`layers_per_block`, `up_block_types`). Without it,
    or for entries the dict lacks, both are read from the keys.
    """
    nrb, attn_up = _unet_layout(sd, config)
    if nrb == 0:
        raise ValueError("UNet: no 'down_blocks.0.resnets.*' keys; not a diffusers UNet state dict")
    return _rename(sd, _unet_rules(nrb, attn_up), "UNet")


def _unet_layout(sd, config):
    """`(res blocks per down level, indices of up blocks with attention)`."""
    if config is not None and not isinstance(config, Mapping):
        levels = len(config.channel_mult)
        return config.num_res_blocks, {levels - 1 - lv for lv in config.attention_levels}
    config = config or {}
    nrb = config.get("layers_per_block")
    if not isinstance(nrb, int):
        if nrb is not None:
            raise ValueError(f"UNet: per-block layers_per_block {nrb!r} are not supported")
        nrb = len(key_indices(sd, "down_blocks.0.resnets."))
    if "up_block_types" in config:
        attn_up = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    else:
        attn_up = {i for i in key_indices(sd, "up_blocks.")
                   if key_indices(sd, f"up_blocks.{i}.attentions.")}
    return nrb, attn_up


def _vae_rules(levels):
    """Rules for a VAE with `levels` resolutions (the decoder's up blocks count down)."""

    def res(prefix, name, param):
        ldm = _VAE_RESNET.get(name)
        return None if ldm is None else f"{prefix}.{ldm}.{param}"

    def attn(prefix, name, param):
        ldm = _VAE_ATTN.get(name)
        return None if ldm is None else f"{prefix}.{ldm}.{param}"

    def up(i):
        return levels - 1 - int(i)

    return _rules([
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", lambda m: m[0]),
        (r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: res(f"encoder.down.{m[1]}.block.{m[2]}", m[3], m[4])),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: res(f"decoder.up.{up(m[1])}.block.{m[2]}", m[3], m[4])),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)",
         lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)",
         lambda m: res(f"{m[1]}.mid.block_{int(m[2]) + 1}", m[3], m[4])),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)",
         lambda m: attn(f"{m[1]}.mid.attn_1", m[2], m[3])),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m: m[0]),
    ])


def vae_diffusers_to_ldm(sd):
    """Rename a diffusers `AutoencoderKL` state dict to LDM VAE keys (no prefix).

    Accepts both attention namings (`to_q/to_k/to_v/to_out.0` and the older
    `query/key/value/proj_attn`); their `[C, C]` linear weights become `[C, C, 1, 1]` views
    for LDM's 1x1 convs.
    """
    levels = len(key_indices(sd, "decoder.up_blocks."))
    if levels == 0:
        raise ValueError("VAE: no 'decoder.up_blocks.*' keys; not a diffusers AutoencoderKL state dict")
    out = _rename(sd, _vae_rules(levels), "VAE")
    return {key: _as_conv1x1(value) if ".mid.attn_1." in key and key.endswith(".weight") else value
            for key, value in out.items()}


def _as_conv1x1(weight):
    """Linear `[C_out, C_in]` -> 1x1 conv `[C_out, C_in, 1, 1]` as a view; conv weights
    (and 1-D norm weights) pass through."""
    return weight[:, :, None, None] if weight.ndim == 2 else weight




def _controlnet_rules(nrb):
    """diffusers `ControlNetModel` names that are not UNet names -> cldm names."""
    hint = {"conv_in": 0, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}, "conv_out": 14}
    return _rules([
        (r"controlnet_cond_embedding\.(conv_in|blocks\.\d+|conv_out)\.(weight|bias)",
         lambda m: f"input_hint_block.{hint[m[1]]}.{m[2]}" if m[1] in hint else None),
        (r"controlnet_down_blocks\.(\d+)\.(weight|bias)", lambda m: f"zero_convs.{m[1]}.0.{m[2]}"),
        (r"controlnet_mid_block\.(weight|bias)", lambda m: f"middle_block_out.0.{m[1]}"),
    ]) + _unet_rules(nrb, set())


def controlnet_diffusers_to_ldm(sd, config=None):
    """Rename a diffusers `ControlNetModel` state dict to the original ControlNet's keys
    (`cldm.ControlNet`, without the `control_model.` prefix). `config`: its config.json dict."""
    nrb = (config or {}).get("layers_per_block")
    if not isinstance(nrb, int):
        nrb = len(key_indices(sd, "down_blocks.0.resnets."))
    if nrb == 0:
        raise ValueError("ControlNet: no 'down_blocks.0.resnets.*' keys; not a diffusers ControlNet")
    return _rename(sd, _controlnet_rules(nrb), "ControlNet")


__all__ = ["unet_diffusers_to_ldm", "vae_diffusers_to_ldm", "controlnet_diffusers_to_ldm"]
