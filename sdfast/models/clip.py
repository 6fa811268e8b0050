"""The CLIP text encoders of Stable Diffusion 1.x and 2.x, named as in LDM single-file checkpoints.

Both are the causal pre-LayerNorm transformer text tower of CLIP (Radford et al. (2021),
"Learning Transferable Visual Models From Natural Language Supervision", section 2.4):

    x = token_embedding(ids) + position_embedding[:T]
    for each block:  x = x + attn(ln_1(x), causal)  ;  x = x + mlp(ln_2(x))
    out = final_layer_norm(x)

- `CLIPTextModel` (SD1): OpenAI CLIP ViT-L/14 in Hugging Face transformers naming, which is how
  LDM's `FrozenCLIPEmbedder` stores it under `cond_stage_model.transformer.`; quick_gelu MLP.
- `OpenCLIPTextModel` (SD2): OpenCLIP ViT-H/14 in open_clip naming, stored by LDM's
  `FrozenOpenCLIPEmbedder` under `cond_stage_model.model.`; exact (erf) gelu MLP, fused q/k/v
  projection (`attn.in_proj_weight`, rows ordered q, k, v as in `torch.nn.MultiheadAttention`).
  SD2 conditions on the PENULTIMATE block (`layer="penultimate"`): `config.skip_last_layers`
  says how many stored blocks are never run. Native LDM files hold all 24 blocks
  (`skip_last_layers=1`); diffusers SD2 folders hold only the first 23, so weights converted
  from them (`sdfast.io.diffusers_clip.openclip_diffusers_to_ldm`) use `skip_last_layers=0`.
  Both give the same output.

`clip_skip` follows AUTOMATIC1111's "CLIP_stop_at_last_layers": 1 is the model's normal output
block, 2 the block before it, ...; `final_layer_norm` / `ln_final` is applied to whichever block's
output is taken (A1111 modules/sd_hijack_clip.py, `FrozenCLIPEmbedderWithCustomWords`
`.encode_with_transformers`).

Attention is causal. `sdfast.ops.attention` has no mask argument yet, so this module calls
`torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)` directly (the text encoder
is ~1% of a generation's run time).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdfastError
from .layers import key_indices

__all__ = ["CLIPTextConfig", "CLIPTextModel", "OpenCLIPTextConfig", "OpenCLIPTextModel",
           "quick_gelu"]

HEAD_DIM = 64  # in every CLIP text tower SD uses: ViT-L/14 768/12, ViT-H/14 1024/16, bigG 1280/20


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu default is the exact erf form


def _check_common(cfg):
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
    if min(cfg.vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.positions, cfg.mlp_width) < 1:
        raise ValueError(f"all sizes must be positive: {cfg}")
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")


def _block_count(sd, prefix):
    """The number of blocks `prefix{i}.*` in a state dict, which must be numbered 0..n-1."""
    found = key_indices(sd, prefix)
    if not found:
        raise ValueError(f"no transformer blocks found (prefix {prefix!r})")
    if found != list(range(len(found))):
        raise ValueError(f"block indices are not 0..n-1: {found}")
    return len(found)


def _require(sd, key):
    if key not in sd:
        raise ValueError(f"missing {key!r}: not a CLIP text encoder state dict with this prefix?")
    return sd[key]


def _heads_for(width):
    if width % HEAD_DIM:
        raise ValueError(f"width {width} is not a multiple of the CLIP head size {HEAD_DIM}")
    return width // HEAD_DIM


@dataclass(frozen=True)
class CLIPTextConfig:
    """OpenAI CLIP text tower (SD1). Defaults: ViT-L/14 as used by SD1.x."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    positions: int = 77
    mlp_width: int = 3072
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5

    def __post_init__(self):
        _check_common(self)

    @classmethod
    def detect_from_weights(cls, sd, prefix=""):
        """The config of the weights in `sd` (keys as `CLIPTextModel.state_dict()`, after `prefix`).

        heads = width // 64; the activation and eps are not stored, so they keep their defaults.
        """
        tok = _require(sd, prefix + "text_model.embeddings.token_embedding.weight")
        pos = _require(sd, prefix + "text_model.embeddings.position_embedding.weight")
        fc1 = _require(sd, prefix + "text_model.encoder.layers.0.mlp.fc1.weight")
        layers = _block_count(sd, prefix + "text_model.encoder.layers.")
        return cls(vocab_size=tok.shape[0], width=tok.shape[1], layers=layers,
                   heads=_heads_for(tok.shape[1]), positions=pos.shape[0], mlp_width=fc1.shape[0])


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP text tower (SD2). Defaults: ViT-H/14 as stored in SD2.x LDM checkpoints.

    `skip_last_layers`: stored blocks never run; 1 for native LDM SD2 weights (penultimate layer),
    0 for weights converted from a diffusers folder (already cut after block 23 of 24).
    `projection_dim` (None: no `text_projection` parameter) and `logit_scale` (whether that scalar
    parameter exists) only mirror what the file holds, so it round-trips; neither is used here.
    """

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    positions: int = 77
    mlp_width: int = 4096
    hidden_act: str = "gelu"
    eps: float = 1e-5
    skip_last_layers: int = 1
    projection_dim: int | None = 1024
    logit_scale: bool = True

    def __post_init__(self):
        _check_common(self)
        if not 0 <= self.skip_last_layers < self.layers:
            raise ValueError(f"skip_last_layers must be in [0, {self.layers}), "
                             f"got {self.skip_last_layers}")

    @classmethod
    def detect_from_weights(cls, sd, prefix="", skip_last_layers=1):
        """The config of the weights in `sd` (keys as `OpenCLIPTextModel.state_dict()`, after
        `prefix`). `skip_last_layers` cannot be read from weights: 1 (the default) for native LDM
        SD2 files, 0 for the output of `openclip_diffusers_to_ldm`. heads = width // 64.
        """
        tok = _require(sd, prefix + "token_embedding.weight")
        pos = _require(sd, prefix + "positional_embedding")
        fc = _require(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")
        layers = _block_count(sd, prefix + "transformer.resblocks.")
        proj = sd.get(prefix + "text_projection")
        return cls(vocab_size=tok.shape[0], width=tok.shape[1], layers=layers,
                   heads=_heads_for(tok.shape[1]), positions=pos.shape[0], mlp_width=fc.shape[0],
                   skip_last_layers=skip_last_layers,
                   projection_dim=None if proj is None else proj.shape[1],
                   logit_scale=prefix + "logit_scale" in sd)


def _causal_attention(q, k, v, heads):
    """Causal multi-head attention of `[B, T, W]` q, k, v (already projected), scale 1/sqrt(D)."""
    b, t, w = q.shape
    # [B, T, W] -> [B, h, T, D]
    q, k, v = (x.reshape(b, t, heads, w // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, T, D]
    return out.transpose(1, 2).reshape(b, t, w)  # [B, h, T, D] -> [B, T, W]


def _blocks_to_run(n_output, clip_skip):
    """How many blocks to run for `clip_skip` when block `n_output` (1-based) is the normal one."""
    if not 1 <= clip_skip <= n_output:
        # SdfastError (a ValueError): bad user input, one line on the command line
        raise SdfastError(f"clip_skip {clip_skip} is out of range: this model's text encoder "
                          f"takes 1 to {n_output}")
    return n_output - clip_skip + 1


def _embed(token_embedding, position_weight, input_ids, inputs_embeds):
    """Token (or given) embeddings plus positions 0..T-1: `[B, T]` ids or `[B, T, W]` embeddings
    -> `[B, T, W]`."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        inputs_embeds = token_embedding(input_ids)  # [B, T] -> [B, T, W]
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [B, T, W], got shape {tuple(inputs_embeds.shape)}")
    t = inputs_embeds.shape[1]
    if t > position_weight.shape[0]:
        raise ValueError(f"sequence length {t} exceeds the {position_weight.shape[0]} positions")
    return inputs_embeds + position_weight[:t]  # rows arange(T) of the position table


def _normal_(tensor, std=1.0):
    """`nn.init.normal_`, skipped on the meta device: loaders build there and assign the file's
    weights, and torch's meta `normal_` imports torch._dynamo (a second of every cold load)."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, std=std)
    return tensor


def _embedding(num, width):
    """`nn.Embedding(num, width)` with its own N(0, 1) initialisation (see `_normal_`)."""
    return nn.Embedding(num, width, _weight=_normal_(torch.empty(num, width)))


# ---- SD1: OpenAI CLIP in transformers naming ---------------------------------------------------

class _CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        out = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class _CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # [B, T, W] -> [B, T, M] -> [B, T, W]


class _CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = _CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = _embedding(cfg.positions, cfg.width)


class _CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(_CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class _CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = _CLIPEmbeddings(cfg)
        self.encoder = _CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    """SD1 text encoder; `state_dict()` keys are the LDM keys after `cond_stage_model.transformer.`.

    `position_ids`, found in many checkpoints (sometimes float or corrupted), is not a parameter or
    buffer: positions are 0..T-1. Loaders drop the keys in `IGNORED_KEYS` before loading.
    """

    IGNORED_KEYS = ("text_model.embeddings.position_ids",)

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = _CLIPTextTransformer(config)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(self, input_ids=None, clip_skip=1, inputs_embeds=None):
        """`[B, T]` token ids (or `[B, T, W]` inputs_embeds) -> `[B, T, W]` hidden states of the
        block chosen by `clip_skip` (1 = last), after `final_layer_norm`."""
        tm = self.text_model
        n = _blocks_to_run(len(tm.encoder.layers), clip_skip)
        x = _embed(tm.embeddings.token_embedding, tm.embeddings.position_embedding.weight,
                   input_ids, inputs_embeds)  # [B, T, W]
        for layer in tm.encoder.layers[:n]:
            x = layer(x)
        return tm.final_layer_norm(x)


# ---- SD2: OpenCLIP in open_clip naming ---------------------------------------------------------

class _OpenCLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, W] -> [B, T, 3W]
        q, k, v = qkv.chunk(3, dim=-1)  # [B, T, 3W] -> 3 x [B, T, W]
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))  # [B, T, W] -> [B, T, M] -> [B, T, W]


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = _OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _OpenCLIPMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """SD2 text encoder; `state_dict()` keys are the LDM keys after `cond_stage_model.model.`.

    `text_projection` ([W, projection_dim]) and `logit_scale` (scalar) are kept as parameters when
    the config says the file has them, so files round-trip; SD2 conditioning uses neither.
    """

    IGNORED_KEYS = ()

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.positions, config.width))
        self.transformer = _OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.eps)
        _normal_(self.positional_embedding, std=0.01)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
            _normal_(self.text_projection, std=config.width ** -0.5)
        if config.logit_scale:
            # CLIP's initial temperature 0.07
            self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def forward(self, input_ids=None, clip_skip=1, inputs_embeds=None):
        """`[B, T]` token ids (or `[B, T, W]` inputs_embeds) -> `[B, T, W]` hidden states of the
        block chosen by `clip_skip` (1 = the last block run, i.e. the penultimate one of native
        SD2 weights), after `ln_final`."""
        blocks = self.transformer.resblocks
        n = _blocks_to_run(len(blocks) - self.config.skip_last_layers, clip_skip)
        x = _embed(self.token_embedding, self.positional_embedding,
                   input_ids, inputs_embeds)  # [B, T, W]
        for block in blocks[:n]:
            x = block(x)
        return self.ln_final(x)
