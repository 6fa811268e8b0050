"""Random kohya-format LoRAs for the lora suite, shaped like the ones people train.

kohya's sd-scripts (`networks/lora.py`) puts a LoRA on every Linear and 1x1 Conv2d inside the
UNet's Transformer2DModels (proj_in, proj_out, attention q/k/v/out, feed-forward) and on every
Linear of the text encoder's attention and MLP, names them by their diffusers / transformers
paths (`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_
self_attn_q_proj`) and usually saves fp16 with an `alpha` per module. The file here has the
same keys, shapes and dtypes, with seeded random factors.
"""
import torch

from ..addons.targets import text_targets, unet_targets

RANK = 32
ALPHA = 16.0
_UNET_LEVELS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")
_TE_PREFIX = "lora_te_text_model_encoder_layers_"


def kohya_modules(unet, text_encoder):
    """`[(kohya name, out features, in shape)]` of kohya's default LoRA targets."""
    out = []
    for table, component, keep in (
            (unet_targets(unet), unet, lambda n: n.startswith(_UNET_LEVELS) and "_attentions_" in n),
            (text_targets(text_encoder), text_encoder, lambda n: n.startswith(_TE_PREFIX))):
        params = dict(component.named_parameters())
        for name in sorted(n for n in table if keep(n)):
            target = table[name]
            shape = tuple(params[target.param].shape)
            rows = shape[0] if target.rows is None else target.rows[1] - target.rows[0]
            out.append((name, rows, shape[1:]))
    return out


def random_kohya_lora(unet, text_encoder, seed, rank=RANK, alpha=ALPHA, dtype=torch.float16):
    """A kohya LoRA state dict for these models: down ~ N(0, 1/fan_in), up ~ N(0, 0.02^2)
    (a trained LoRA's scale), alpha `alpha` (scale alpha / rank)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, rows, in_shape in kohya_modules(unet, text_encoder):
        fan_in = int(torch.Size(in_shape).numel())
        ones = (1,) * (len(in_shape) - 1)                       # 1x1 convs: [r, C, 1, 1]
        down = torch.randn(rank, *in_shape, generator=gen) / fan_in ** 0.5
        up = 0.02 * torch.randn(rows, rank, *ones, generator=gen)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd
