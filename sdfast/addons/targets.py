"""Which weight a LoRA module name means: the names LoRA files use, mapped to sdfast's
parameters (LDM names, `sdfast.models`).

A LoRA names the layer it changes in one of three spellings:
- kohya / A1111: `lora_unet_<diffusers module path with _ for .>` (or, in older files, the LDM
  path: `lora_unet_input_blocks_1_1_proj_in`), `lora_te_<transformers CLIP path>`;
- diffusers / PEFT: the dotted diffusers path under `unet.` / `text_encoder.`;
- LDM dotted paths (`diffusion_model.` / `model.diffusion_model.` prefixes stripped).

`unet_targets(unet)` and `text_targets(text_encoder)` return `{name: Target}` covering every
spelling, so a file's module name is looked up once. SD2's OpenCLIP text encoder fuses q, k, v
into `attn.in_proj_weight`: `self_attn.q_proj` is its first third of rows (`Target.rows`).
"""
import re
from dataclasses import dataclass

from sdfast.io.diffusers_unet import _unet_rules

_SUFFIX = ".weight"


@dataclass(frozen=True)
class Target:
    """A weight of a component: `param` (a name in `component.named_parameters()`) and, for
    SD2's fused q/k/v, the row range `(start, stop)` the LoRA changes."""

    component: str          # "unet" or "text_encoder"
    param: str
    rows: tuple | None = None


def _kohya(path):
    return path.replace(".", "_")


def _diffusers_unet_modules(unet):
    """Every diffusers module path that can name a weight of `unet` (over-generated from the
    config, then kept only where the rules land on a real parameter)."""
    cfg = unet.config
    levels = len(cfg.channel_mult)
    depth = cfg.transformer_depth
    inner = ["proj_in", "proj_out"]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        inner += [f"{block}.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
        inner += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    resnet = ["conv1", "conv2", "time_emb_proj", "conv_shortcut"]
    names = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            names += [f"down_blocks.{i}.resnets.{j}.{r}" for r in resnet]
            names += [f"down_blocks.{i}.attentions.{j}.{a}" for a in inner]
            names += [f"up_blocks.{i}.resnets.{j}.{r}" for r in resnet]
            names += [f"up_blocks.{i}.attentions.{j}.{a}" for a in inner]
        names += [f"down_blocks.{i}.downsamplers.0.conv", f"up_blocks.{i}.upsamplers.0.conv"]
    names += [f"mid_block.resnets.{j}.{r}" for j in (0, 1) for r in resnet]
    names += [f"mid_block.attentions.0.{a}" for a in inner]
    return names


def unet_diffusers_names(unet):
    """`{LDM weight name: diffusers module path}` for every conv/linear weight of an
    `sdfast.models.unet.UNetModel` that has a diffusers spelling (the names kohya's LoRA
    modules are built from: `lora_unet_` + the path with `_` for `.`)."""
    cfg = unet.config
    params = {name for name, p in unet.named_parameters() if name.endswith(_SUFFIX) and p.dim() >= 2}
    levels = len(cfg.channel_mult)
    attn_up = {levels - 1 - lv for lv in cfg.attention_levels}
    rules = _unet_rules(cfg.num_res_blocks, attn_up)
    out = {}
    for module in _diffusers_unet_modules(unet):
        key = module + _SUFFIX
        for pattern, fn in rules:
            m = pattern.fullmatch(key)
            if m:
                ldm = fn(m)
                if ldm in params:
                    out[ldm] = module
                break
    return out


def unet_targets(unet):
    """`{module name: Target}` for every conv/linear weight of an `sdfast.models.unet.UNetModel`,
    under its diffusers path, its kohya name (both conventions) and its LDM path."""
    out = {}
    for ldm, p in unet.named_parameters():
        if ldm.endswith(_SUFFIX) and p.dim() >= 2:
            module = ldm[: -len(_SUFFIX)]
            out[module] = out["lora_unet_" + _kohya(module)] = Target("unet", ldm)
    for ldm, module in unet_diffusers_names(unet).items():
        out[module] = out["lora_unet_" + _kohya(module)] = Target("unet", ldm)
    return out


_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_NAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def text_targets(text_encoder):
    """`{module name: Target}` for the linear weights of the text encoder's transformer layers,
    under the transformers CLIP path (how kohya and diffusers name both SD1's and SD2's) and
    its kohya spelling; for OpenCLIP also the open_clip path."""
    params = dict(text_encoder.named_parameters())
    out = {}

    def put(hf_module, target):
        # transformers 5 names CLIPTextModel's modules without `text_model.`: accept both.
        for name in (hf_module, hf_module[len("text_model."):]):
            out[name] = target
            out["lora_te_" + _kohya(name)] = target

    if "text_model.embeddings.token_embedding.weight" in params:           # SD1 CLIP
        for name, p in params.items():
            if name.endswith(_SUFFIX) and p.dim() == 2 and _HF_LAYER.fullmatch(name[: -len(_SUFFIX)]):
                put(name[: -len(_SUFFIX)], Target("text_encoder", name))
        return out
    width = params["token_embedding.weight"].shape[1]                       # SD2 OpenCLIP
    layer = 0
    while f"transformer.resblocks.{layer}.attn.in_proj_weight" in params:
        base = f"transformer.resblocks.{layer}"
        hf = f"text_model.encoder.layers.{layer}"
        for name, index in _QKV.items():
            put(f"{hf}.{name}", Target("text_encoder", f"{base}.attn.in_proj_weight",
                                       (index * width, (index + 1) * width)))
        for name, oc in _OPENCLIP_NAMES.items():
            target = Target("text_encoder", f"{base}.{oc}.weight")
            put(f"{hf}.{name}", target)
            out[f"{base}.{oc}"] = target
        layer += 1
    return out


def text_hf_names(text_encoder):
    """`[(transformers module path, Target)]` of the text encoder's attention and MLP linears
    (`text_model.encoder.layers.N.self_attn.q_proj`, ...), in layer order, for the layers the
    encoder runs (SD2 files hold one more that SD never uses), as kohya and diffusers name them."""
    skip = getattr(text_encoder.config, "skip_last_layers", 0)
    runs = text_encoder.config.layers - skip
    out = []
    for name, target in text_targets(text_encoder).items():
        m = _HF_LAYER.fullmatch(name)
        if m and int(m[1]) < runs:
            out.append((name, target))
    return sorted(out, key=lambda pair: (int(_HF_LAYER.fullmatch(pair[0])[1]), pair[0]))


def kohya_name(component, module):
    """kohya's LoRA module name: `lora_unet_` / `lora_te_` + the module path, `.` as `_`."""
    return ("lora_unet_" if component == "unet" else "lora_te_") + _kohya(module)


__all__ = ["Target", "unet_targets", "text_targets", "unet_diffusers_names", "text_hf_names",
           "kohya_name"]
