"""`sdfast.accelerate`: sdfast's ops inside diffusers models, per instance, reversible.

Tolerance as everywhere in the parity tests (`_diffusers_models.earned_error`): the accelerated
fp32 output may be at most twice as far from a float64 run of the original as the original's
own fp32 run is, plus a few fp32 ulps of the output's magnitude.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdfast
from _diffusers_models import (WINOGRAD_ERROR_FACTOR, earned_error, float64_copy, make_unet,
                               make_vae)
from _pipelines import make_reference
from sdfast.accelerate_diffusers import SdfastAttnProcessor
from sdfast.errors import SdfastError


class OpCounts(TorchDispatchMode):
    """Counts the dispatched ops by name (`sdfast.group_norm`, `aten.native_group_norm`, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def any(self, word):
        return sum(n for name, n in self.counts.items() if word in name)


def _unet_inputs(unet, batch=2, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([10.0, 500.0])[:batch]
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _assert_earned(out, ref32, ref64):
    # the swapped convolutions may run Winograd: its error factor, as the models' parity tests
    err, bound = earned_error(out, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
    assert err <= bound, f"max error {err:.3g} > earned tolerance {bound:.3g}"


@torch.no_grad()
@pytest.mark.parametrize("name", ["small", "small_linear"])
def test_unet_output_within_earned_tolerance_and_every_norm_and_attention_swapped(name):
    unet = make_unet(name)
    x, t, ctx = _unet_inputs(unet)
    ref32 = unet(x, t, ctx).sample
    ref64 = float64_copy(unet)(x.double(), t, ctx.double()).sample
    handle = sdfast.accelerate(unet)
    assert handle.counts["resnet"] > 0 and handle.counts["attention"] > 0
    assert handle.counts["group_norm_silu"] == 1 and handle.counts["attention_skipped"] == 0
    with OpCounts() as ops:
        out = unet(x, t, ctx).sample
    _assert_earned(out, ref32, ref64)
    assert ops.any("aten.native_group_norm") == 0 and ops.any("scaled_dot_product") == 0
    assert ops.any("sdfast.attention") == handle.counts["attention"]
    convs = sum(type(m) is torch.nn.Conv2d for m in unet.modules())
    assert handle.counts["conv"] == convs and ops.any("sdfast.conv2d") == convs
    assert ops.any("aten.convolution") == 0
    resnets = handle.counts["resnet"]
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    # two fused norms per res block, one per transformer input, conv_norm_out + SiLU
    assert ops.any("sdfast.group_norm") == 2 * resnets + transformers + 1
    assert handle.undo() > 0
    assert torch.equal(unet(x, t, ctx).sample, ref32)


@torch.no_grad()
def test_vae_encode_decode_within_earned_tolerance():
    vae = make_vae("small")
    vae64 = float64_copy(vae)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    latent = torch.randn(2, 4, 8, 8, generator=g)
    refs = [vae.encode(image).latent_dist.mean, vae.decode(latent).sample]
    refs64 = [vae64.encode(image.double()).latent_dist.mean, vae64.decode(latent.double()).sample]
    handle = sdfast.accelerate(vae)
    assert handle.counts["attention"] == 2 and handle.counts["group_norm_silu"] == 2
    with OpCounts() as ops:
        outs = [vae.encode(image).latent_dist.mean, vae.decode(latent).sample]
    assert ops.any("aten.native_group_norm") == 0 and ops.any("sdfast.attention") == 2
    for out, ref32, ref64 in zip(outs, refs, refs64):
        _assert_earned(out, ref32, ref64)
    sdfast.accelerate(vae, undo=True)
    assert torch.equal(vae.decode(latent).sample, refs[1])


def _generate(pipe, latents):
    return pipe("a red circle", num_inference_steps=4, guidance_scale=7.0, latents=latents,
                output_type="pt", height=64, width=64).images


@torch.no_grad()
def test_four_step_generate_within_earned_tolerance(tmp_path):
    ref = make_reference("small_sd1", tmp_path)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref32 = _generate(ref, latents)
    ref64 = _generate(copy.deepcopy(ref).to(torch.float64), latents.double())
    handle = sdfast.accelerate(ref)
    assert all(isinstance(p, SdfastAttnProcessor) for p in ref.unet.attn_processors.values())
    out = _generate(ref, latents)
    _assert_earned(out, ref32, ref64)
    assert not torch.equal(out, ref32)           # the sdfast ops did run (rounding differs)
    handle.undo()
    assert torch.equal(_generate(ref, latents), ref32)


@torch.no_grad()
def test_only_the_given_instances_change():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    before = (ResnetBlock2D.forward, torch.nn.GroupNorm.forward, AttnProcessor2_0.__call__)
    unet, other = make_unet("small"), make_unet("small")
    x, t, ctx = _unet_inputs(unet)
    expected = other(x, t, ctx).sample
    sdfast.accelerate(unet)
    sdfast.accelerate(unet)                     # twice: nothing is wrapped twice
    assert (ResnetBlock2D.forward, torch.nn.GroupNorm.forward, AttnProcessor2_0.__call__) == before
    with OpCounts() as ops:
        assert torch.equal(other(x, t, ctx).sample, expected)
    assert ops.any("sdfast.") == 0
    assert not any("forward" in vars(m) for m in other.modules())
    assert sdfast.accelerate(unet, undo=True) > 0
    assert not any("forward" in vars(m) for m in unet.modules())
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_custom_processors_are_left_alone_and_bad_input_is_an_error():
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet("small")
    unet.set_attn_processor(AttnProcessor())    # the pre-2.0 processor: same math, swapped
    assert sdfast.accelerate(unet).counts["attention"] > 0
    other = make_unet("small")

    class Custom(AttnProcessor):
        pass

    other.set_attn_processor(Custom())
    counts = sdfast.accelerate(other).counts
    assert counts["attention"] == 0 and counts["attention_skipped"] > 0
    with pytest.raises(SdfastError, match="accelerate takes a diffusers pipeline"):
        sdfast.accelerate("not a pipeline")
