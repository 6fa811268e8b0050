"""The LDM-named UNet (sdfast.models.unet) and its diffusers key map (sdfast.io.diffusers_unet).

References, all independent of sdfast:
- diffusers' `UNet2DConditionModel` with seeded random weights (norms randomized too), run in
  fp32 and fp64, including its ControlNet inputs `down_block_additional_residuals` /
  `mid_block_additional_residual` and its odd-size upsampling;
- diffusers' single-file converter `convert_ldm_unet_checkpoint` and model-type detector
  `infer_diffusers_model_type` (LDM names -> diffusers names), and real SD1 key names
  published by diffusers (`CHECKPOINT_KEY_NAMES`) and by ComfyUI-GGUF's architecture
  detection (`input_blocks.3.0.op`, `output_blocks.2.1.conv`, `output_blocks.5.2.conv`, ...).

Tolerance (flash-attention's rule, "earned, not guessed"): against diffusers' fp64 run, our
fp32 error may be at most 2x diffusers' own fp32 error plus 4 fp32 ulps of the output scale
(see `_diffusers_models.earned_error`), 8x where our 3x3 convolutions may run Winograd (the cpu
backend; `WINOGRAD_ERROR_FACTOR`, asserted per convolution in tests/test_conv.py). Both fp32 runs
do the same math in a different order, so their round-off is of one size;
`test_tolerance_catches_a_small_weight_error` shows the bound is tight enough to catch a 1e-3
change in a single norm bias.
"""
import copy
import dataclasses
import gc
import math

import pytest
import torch
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_unet_checkpoint,
                                                 infer_diffusers_model_type)

from _diffusers_models import (UNET_CONFIGS, WINOGRAD_ERROR_FACTOR, earned_error, float64_copy,
                               make_unet)
from sdfast.io.diffusers_unet import unet_diffusers_to_ldm
from sdfast.models.unet import UNetConfig, UNetModel

PREFIX = "model.diffusion_model."
SMALL = ["small", "small_linear"]


def expected_config(name):
    """Our config for `UNET_CONFIGS[name]`, written from the diffusers arguments."""
    kw = UNET_CONFIGS[name]
    widths = kw["block_out_channels"]
    # diffusers' `attention_head_dim` is, for these models, the number of heads per block.
    heads = kw["attention_head_dim"]
    if isinstance(heads, int):
        head = dict(num_heads=heads)
    else:
        (dim,) = {w // h for w, h in zip(widths, heads)}
        head = dict(head_dim=dim)
    return UNetConfig(
        in_channels=kw["in_channels"], out_channels=kw["out_channels"], model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=kw["layers_per_block"],
        attention_levels=tuple(i for i, t in enumerate(kw["down_block_types"]) if "CrossAttn" in t),
        transformer_depth=kw.get("transformer_layers_per_block", 1),
        context_dim=kw["cross_attention_dim"],
        use_linear_in_transformer=kw.get("use_linear_projection", False),
        norm_groups=kw.get("norm_num_groups", 32), **head)


def load_ours(diffusers_model, config):
    """Ours built on meta and loaded strictly from the renamed diffusers weights."""
    with torch.device("meta"):
        model = UNetModel(config)
    model.load_state_dict(unet_diffusers_to_ldm(diffusers_model.state_dict()), strict=True,
                          assign=True)
    return model.eval()


def skip_shapes(name, batch, h, w):
    """`[B, C, h, w]` of every input block's output, then the middle block's, from the
    diffusers arguments (conv stride 2, padding 1 rounds up)."""
    kw = UNET_CONFIGS[name]
    widths = kw["block_out_channels"]
    shapes = [(batch, widths[0], h, w)]
    for level, width in enumerate(widths):
        shapes += [(batch, width, h, w)] * kw["layers_per_block"]
        if level < len(widths) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            shapes.append((batch, width, h, w))
    return shapes + [(batch, widths[-1], h, w)]


def inputs(name, batch, h, w, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = UNET_CONFIGS[name]
    x = torch.randn(batch, kw["in_channels"], h, w, generator=g)
    t = torch.tensor([10.5, 937.25, 500.0, 1.0][:batch])  # fractional timesteps
    context = torch.randn(batch, tokens, kw["cross_attention_dim"], generator=g)
    return x, t, context


@torch.no_grad()
def run_diffusers(model, x, t, context, control=None):
    dtype = next(model.parameters()).dtype
    extra = {}
    if control is not None:
        extra = dict(down_block_additional_residuals=tuple(c.to(dtype) for c in control[:-1]),
                     mid_block_additional_residual=control[-1].to(dtype))
    return model(x.to(dtype), t, context.to(dtype), **extra).sample


def assert_parity(ours, ref32, ref64):
    err, bound = earned_error(ours, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
    assert err <= bound, f"max error {err:.3g} vs fp64 exceeds the earned bound {bound:.3g}"


def check_parity(name, batch, h, w, tokens, control=False):
    ref = make_unet(name)
    ours = load_ours(ref, expected_config(name))
    x, t, context = inputs(name, batch, h, w, tokens)
    res = None
    if control:
        g = torch.Generator().manual_seed(7)
        res = [0.5 * torch.randn(s, generator=g) for s in skip_shapes(name, batch, h, w)]
    with torch.no_grad():
        out = ours(x, t, context, control=res)
    assert out.shape == (batch, UNET_CONFIGS[name]["out_channels"], h, w)
    assert_parity(out, run_diffusers(ref, x, t, context, res),
                  run_diffusers(float64_copy(ref), x, t, context, res))


# ---------------------------------------------------------------- parity, small configs (fast)

@pytest.mark.parametrize("tokens", [77, 154])
@pytest.mark.parametrize("name", SMALL)
def test_small_parity(name, tokens):
    torch.manual_seed(0)
    check_parity(name, batch=2, h=16, w=16, tokens=tokens)


@pytest.mark.parametrize("name", SMALL)
def test_small_parity_with_control(name):
    torch.manual_seed(0)
    check_parity(name, batch=2, h=16, w=16, tokens=77, control=True)


def test_small_parity_odd_latent():
    """9x11 latents do not halve exactly: upsampling must match each skip's size, as diffusers'
    `forward_upsample_size` does."""
    torch.manual_seed(0)
    check_parity("small", batch=2, h=9, w=11, tokens=77)


def test_inpainting_parity():
    torch.manual_seed(0)
    check_parity("small_inpaint", batch=2, h=8, w=8, tokens=77)


def test_bfloat16_weights_run_in_bfloat16():
    """No dtype logic beyond the tensors: bf16 weights and inputs give a bf16 result, as close
    to diffusers' fp64 run as diffusers' own bf16 run (same earned rule, bf16 round-off)."""
    torch.manual_seed(0)
    ref = make_unet("small")
    ours = load_ours(ref, expected_config("small")).to(torch.bfloat16)
    x, t, context = inputs("small", 2, 16, 16, 77)
    with torch.no_grad():
        out = ours(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    # The plain earned factor 2, not WINOGRAD_ERROR_FACTOR: the cpu backend (Winograd) takes
    # fp32 only, so bf16 runs the same reference ops as diffusers. Measured max-error ratio
    # ours / diffusers' bf16: 0.97 (0.83-1.00 over input seeds 0-3).
    err, bound = earned_error(out, run_diffusers(ref16, x, t, context),
                              run_diffusers(float64_copy(ref), x, t, context), factor=2)
    assert err <= bound, f"max error {err:.3g} vs fp64 exceeds the earned bound {bound:.3g}"


def test_tolerance_catches_a_small_weight_error():
    """The earned bound is tight, with the Winograd factor too: a 1e-3 shift of one GroupNorm
    bias must break parity."""
    torch.manual_seed(0)
    ref = make_unet("small")
    ours = load_ours(ref, expected_config("small"))
    with torch.no_grad():
        bias = ours.output_blocks[1][0].out_layers[0].bias
        ours.output_blocks[1][0].out_layers[0].bias = torch.nn.Parameter(bias + 1e-3)
        x, t, context = inputs("small", 2, 16, 16, 77)
        err, bound = earned_error(ours(x, t, context), run_diffusers(ref, x, t, context),
                                  run_diffusers(float64_copy(ref), x, t, context),
                                  factor=WINOGRAD_ERROR_FACTOR)
    assert err > bound


def test_control_needs_one_residual_per_skip_and_middle():
    torch.manual_seed(0)
    cfg = expected_config("small")
    model = UNetModel(cfg).eval()
    x, t, context = inputs("small", 1, 8, 8, 77)
    control = [torch.zeros(s) for s in skip_shapes("small", 1, 8, 8)]
    with torch.no_grad():
        model(x, t, context, control=control)
        with pytest.raises(ValueError, match="residuals"):
            model(x, t, context, control=control[:-1])


# ---------------------------------------------------------------- parity, real shapes (slow)

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_parity(name):
    """Real SD1.5 / SD2.1 shapes at an 8x8 latent, 77- and 154-token contexts. Peak memory is
    one fp64 diffusers model: ours shares the fp32 weights and is freed before the fp64 run."""
    torch.manual_seed(0)
    ref = make_unet(name)
    ours = load_ours(ref, expected_config(name))
    cases = [inputs(name, 2, 8, 8, tokens, seed=tokens) for tokens in (77, 154)]
    with torch.no_grad():
        outs = [ours(*case) for case in cases]
    del ours
    gc.collect()
    refs32 = [run_diffusers(ref, *case) for case in cases]
    ref.double()
    for out, ref32, case in zip(outs, refs32, cases):
        assert_parity(out, ref32, run_diffusers(ref, *case))


# ---------------------------------------------------------------- key layout and key map

# Real SD1.x single-file keys, published by diffusers (CHECKPOINT_KEY_NAMES) and used for
# architecture detection by ComfyUI-GGUF (the resampler positions).
SD1_REAL_KEYS = [
    CHECKPOINT_KEY_NAMES["v1"], CHECKPOINT_KEY_NAMES["v2"], CHECKPOINT_KEY_NAMES["inpainting"],
    PREFIX + "input_blocks.3.0.op.weight", PREFIX + "input_blocks.6.0.op.weight",
    PREFIX + "input_blocks.9.0.op.weight", PREFIX + "output_blocks.2.1.conv.weight",
    PREFIX + "output_blocks.5.2.conv.weight", PREFIX + "output_blocks.8.2.conv.weight",
    PREFIX + "time_embed.0.weight", PREFIX + "time_embed.2.bias", PREFIX + "out.0.weight",
    PREFIX + "out.2.bias", PREFIX + "middle_block.0.in_layers.0.weight",
    PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
]


def ldm_checkpoint(name):
    """Our model's state dict under the single-file prefix (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = UNetModel(expected_config(name))
    return {PREFIX + k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,family", [("sd15", "v1"), ("sd21", "v2"),
                                         ("sd15_inpaint", "inpainting")])
def test_keys_are_real_single_file_keys(name, family):
    ckpt = ldm_checkpoint(name)
    assert not [k for k in SD1_REAL_KEYS if k not in ckpt]
    assert infer_diffusers_model_type(ckpt) == family


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd15_inpaint", "small", "small_linear"])
def test_diffusers_converter_maps_our_keys_onto_its_model(name):
    """diffusers' LDM->diffusers converter turns our keys into exactly its model's keys and
    shapes, so a real single-file checkpoint loads into ours with no renaming."""
    ckpt = ldm_checkpoint(name)
    ref = make_unet(name, device="meta")
    converted = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ckpt) == len(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.parametrize("name", SMALL + ["small_inpaint"])
def test_key_map_round_trip_through_diffusers_converter(name):
    """diffusers -> (ours) LDM -> (diffusers' converter) diffusers gives back every tensor,
    under its own name; our map only renames (the very same tensor objects)."""
    ref = make_unet(name, device="meta")
    sd = ref.state_dict()
    ldm = unet_diffusers_to_ldm(sd)
    assert {id(v) for v in ldm.values()} == {id(v) for v in sd.values()}
    back = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ldm.items()}, dict(ref.config))
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("config_kind", ["none", "ours", "diffusers_json"])
def test_key_map_config_sources_agree(config_kind):
    """The layout comes from the keys, a UNetConfig or a diffusers config.json dict alike."""
    ref = make_unet("sd15", device="meta")
    config = {"none": None, "ours": expected_config("sd15"), "diffusers_json": dict(ref.config)}
    ldm = unet_diffusers_to_ldm(ref.state_dict(), config[config_kind])
    assert {PREFIX + k for k in ldm} == ldm_checkpoint("sd15").keys()


def test_key_map_rejects_unknown_keys():
    sd = make_unet("small", device="meta").state_dict()
    bad = dict(sd, **{"add_embedding.linear_1.weight": torch.zeros(1),
                      "down_blocks.0.attentions.0.transformer_blocks.0.attn1.norm_q.weight":
                          torch.zeros(1)})
    with pytest.raises(ValueError) as info:
        unet_diffusers_to_ldm(bad)
    assert "add_embedding.linear_1.weight" in str(info.value)
    assert "attn1.norm_q.weight" in str(info.value)


# ---------------------------------------------------------------- config and construction

@pytest.mark.parametrize("name", ["sd15", "sd21", "sd15_inpaint", "small", "small_inpaint"])
def test_detect_from_weights(name):
    sd = unet_diffusers_to_ldm(make_unet(name, device="meta").state_dict())
    assert UNetConfig.detect_from_weights(sd) == expected_config(name)


def test_detect_from_weights_head_override():
    """Heads are not in the weights: the SD2 rule says head_dim 64, an override wins.
    (Neither are norm groups: every LDM UNet uses 32, this test model 8.)"""
    sd = unet_diffusers_to_ldm(make_unet("small_linear", device="meta").state_dict())
    expected = dataclasses.replace(expected_config("small_linear"), norm_groups=32)
    assert UNetConfig.detect_from_weights(sd, head_dim=16) == expected
    detected = UNetConfig.detect_from_weights(sd)
    assert (detected.head_dim, detected.num_heads) == (64, None)
    assert detected == dataclasses.replace(expected, head_dim=64)


def test_detect_rejects_other_layouts():
    sd = ldm_checkpoint("small")
    with pytest.raises(ValueError, match="model.diffusion_model"):
        UNetConfig.detect_from_weights(sd)
    unprefixed = {k[len(PREFIX):]: v for k, v in sd.items()}
    with pytest.raises(ValueError, match="label_emb"):
        UNetConfig.detect_from_weights(dict(unprefixed, **{"label_emb.0.0.weight": torch.zeros(1)}))


def test_config_head_rule_and_validation():
    assert (UNetConfig().num_heads, UNetConfig().head_dim) == (8, None)
    sd2 = UNetConfig(use_linear_in_transformer=True, context_dim=1024)
    assert (sd2.num_heads, sd2.head_dim) == (None, 64)
    assert sd2.heads(1280) == (20, 64) and UNetConfig().heads(1280) == (8, 160)
    with pytest.raises(ValueError, match="only one"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="split"):
        UNetConfig(head_dim=48).heads(320)
    with pytest.raises(ValueError, match="out of range"):
        UNetConfig(attention_levels=(4,))


def test_meta_construction_has_only_checkpoint_keys():
    with torch.device("meta"):
        model = UNetModel(UNetConfig())
    assert not list(model.buffers())
    assert model.state_dict().keys() == dict(model.named_parameters()).keys()
    assert all(p.is_meta for p in model.parameters())


def test_row_chunked_transformer_block_equals_the_whole_block(monkeypatch):
    # CPU inference runs a block's row-local part (cross-attention, feed-forward) in chunks of
    # tokens; each token's result must not depend on the chunking. 300 tokens at batch 2: chunks
    # of 32 tokens, the last one short.
    import sdfast.models.unet as U

    torch.manual_seed(0)
    block = U.BasicTransformerBlock(64, 2, 32, 48).eval()
    x, context = torch.randn(2, 300, 64), torch.randn(2, 77, 48)
    chunks = []
    real = U.BasicTransformerBlock._row_local
    monkeypatch.setattr(U.BasicTransformerBlock, "_row_local",
                        lambda self, x, c, kv=None: chunks.append(x.shape[1]) or real(self, x, c, kv))
    context_rows = []  # the context's keys and values are projected once, not per chunk
    block.attn2.to_k.register_forward_hook(lambda m, args, out: context_rows.append(args[0].shape[1]))
    with torch.inference_mode():
        monkeypatch.setattr(U, "ROW_CHUNK_ROWS", 64)
        chunked = block(x, context)
        assert chunks == [32] * 9 + [12] and context_rows == [77]
        monkeypatch.setattr(U, "ROW_CHUNK_ROWS", 10 ** 9)
        whole = block(x, context)
        assert chunks[-1] == 300
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)                               # training: never chunked
    monkeypatch.setattr(U, "ROW_CHUNK_ROWS", 64)
    block(x, context).sum().backward()
    assert chunks[-1] == 300 and x.grad is not None
