"""ControlNet at inference against diffusers' ControlNetModel and StableDiffusionControlNetPipeline
on the same random weights (SD1 and SD2 shapes), in both file formats."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdfast
from _pipelines import family_of, make_reference, save_single_file
from sdfast.errors import SdfastError
from sdfast.io.diffusers_unet import controlnet_diffusers_to_ldm

PROMPT = "a large red circle at the top left on a blue background"


def random_controlnet(ref, seed=0):
    """diffusers ControlNetModel copied from the UNet, with its zero layers made non-zero."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(ref.unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks,
                       net.controlnet_mid_block]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.05)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return net.eval()


@pytest.fixture(scope="module", params=["small_sd1", "small_sd2"])
def setup(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind + "_cn")
    ref = make_reference(kind, tmp)
    single = save_single_file(ref, family_of(kind), tmp / "model.safetensors")
    net = random_controlnet(ref)
    folder = tmp / "controlnet"
    net.save_pretrained(str(folder))
    original = tmp / "control_original.safetensors"
    cldm = controlnet_diffusers_to_ldm(net.state_dict(), dict(net.config))
    save_file({"control_model." + k: v.contiguous() for k, v in cldm.items()}, str(original))
    return kind, ref, single, net, folder, original


def hint_image(size=64, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[8:40, 10:50] = 255                                   # an edge-map-like block
    pixels[rng.random((size, size)) < 0.05] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("source", ["original", "diffusers"])
def test_controlnet_residuals_match_diffusers(setup, source):
    kind, ref, single, net, folder, original = setup
    ours = sdfast.load_controlnet(original if source == "original" else folder)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([700.0, 30.0])
    ctx = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=gen)
    hint = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        got = ours(x, hint, t, ctx)
    want = [*down, mid]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert max(b.abs().max().item() for b in want) > 1e-2          # not a zero ControlNet


def diffusers_controlnet_generate(ref, net, image, noise, scale, steps=4, cfg=7.0):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
        controlnet=net, scheduler=ref.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, image=image, latents=noise.clone(), height=64, width=64,
                    num_inference_steps=steps, guidance_scale=cfg,
                    controlnet_conditioning_scale=scale, output_type="pt").images


def test_generate_with_control_matches_diffusers(setup):
    kind, ref, single, net, folder, original = setup
    pipe = sdfast.load(single)
    image = hint_image()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    control = sdfast.Control(sdfast.load_controlnet(original), image, strength=0.8)
    ours = pipe.generate(PROMPT, "", width=64, height=64, steps=4, cfg=7.0, noise=noise,
                         control=[control], output="tensor", progress=False)
    theirs = diffusers_controlnet_generate(ref, net, image, noise, 0.8)
    plain = pipe.generate(PROMPT, "", width=64, height=64, steps=4, cfg=7.0, noise=noise,
                          output="tensor", progress=False)
    effect = (theirs - plain).abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert effect > 1e-2, effect
    assert err < 1e-4, (err, effect)                 # the tolerance of test_pipeline's parity


def test_strength_and_timing(setup):
    kind, ref, single, net, folder, original = setup
    pipe = sdfast.load(single)
    cn = sdfast.load_controlnet(folder)
    kw = dict(width=64, height=64, steps=4, seed=5, output="tensor", progress=False)
    plain = pipe.generate(PROMPT, **kw)
    full = pipe.generate(PROMPT, control=sdfast.Control(cn, hint_image()), **kw)
    assert not torch.allclose(full, plain, atol=1e-3)
    assert torch.equal(pipe.generate(PROMPT, control=sdfast.Control(cn, hint_image(), strength=0.0), **kw), plain)
    never = sdfast.Control(cn, hint_image(), start=1.0, end=1.0)        # t in [0, 0]: no step
    assert torch.equal(pipe.generate(PROMPT, control=never, **kw), plain)
    late = pipe.generate(PROMPT, control=sdfast.Control(cn, hint_image(), start=0.5), **kw)
    assert not torch.equal(late, plain) and not torch.equal(late, full)
    double = pipe.generate(PROMPT, control=[sdfast.Control(cn, hint_image(), strength=0.5)] * 2, **kw)
    torch.testing.assert_close(double, full, rtol=0, atol=1e-5)         # residuals add up


def test_bad_controlnets_are_clear_errors(setup, tmp_path):
    kind, ref, single, net, folder, original = setup
    pipe = sdfast.load(single)
    with pytest.raises(SdfastError, match="no such ControlNet"):
        sdfast.load_controlnet(tmp_path / "missing.pth")
    with pytest.raises(SdfastError, match="not a ControlNet"):
        sdfast.load_controlnet(single)
    from sdfast.io.checkpoint import read_checkpoint
    sd, _ = read_checkpoint(original)
    save_file({k: v.contiguous() for k, v in sd.items() if "input_hint_block" not in k},
              str(tmp_path / "no_hint.safetensors"))
    with pytest.raises(SdfastError, match="a ControlNet without its hint encoder"):
        sdfast.load_controlnet(tmp_path / "no_hint.safetensors")
    cn = sdfast.load_controlnet(original)
    other = type(cn)(dataclasses.replace(cn.config, unet=dataclasses.replace(
        cn.config.unet, context_dim=cn.config.unet.context_dim * 2)))
    with pytest.raises(SdfastError, match="wide text"):
        pipe.generate(PROMPT, width=64, height=64, steps=1, progress=False,
                      control=sdfast.Control(other, hint_image()))
    with pytest.raises(SdfastError, match="start/end"):
        pipe.generate(PROMPT, width=64, height=64, steps=1, progress=False,
                      control=sdfast.Control(cn, hint_image(), start=0.8, end=0.2))


def test_modes_scale_and_halve_as_a1111(setup):
    from sdfast.addons.controlnet import ActiveControl

    # A1111 sd-webui-controlnet's soft injection ("My prompt is more important" / "ControlNet is
    # more important"): residual i of n scaled by 0.825 ** (n - 1 - i). Written here, not
    # imported from the code under test, so a changed constant fails.
    soft_injection = 0.825

    kind, ref, single, net, folder, original = setup
    cn = sdfast.load_controlnet(folder)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.full((4,), 500.0)
    ctx = torch.randn(4, 77, ref.unet.config.cross_attention_dim, generator=gen)
    hint = torch.rand(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        base = ActiveControl(cn, hint, 0.5, 0.0, 999.0).residuals(x, t, ctx, 2)
        soft = ActiveControl(cn, hint, 0.5, 0.0, 999.0, "prompt").residuals(x, t, ctx, 2)
        cond = ActiveControl(cn, hint, 0.5, 0.0, 999.0, "controlnet").residuals(x, t, ctx, 2)
    n = len(base)
    for i in range(n):
        factor = soft_injection ** (n - 1 - i)
        torch.testing.assert_close(soft[i], base[i] * factor, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cond[i][:2], soft[i][:2], rtol=0, atol=0)
        assert torch.count_nonzero(cond[i][2:]) == 0                 # the unconditional half
    assert torch.count_nonzero(base[-1][2:]) > 0


def test_cli_controlnet_group(setup, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    kind, ref, single, net, folder, original = setup
    if kind != "small_sd1":
        pytest.skip("one family is enough for the flags")
    hint_image().save(tmp_path / "hint.png")
    common = ["generate", "--model", str(single), "--prompt", "x", "--steps", "2", "-W", "64",
              "-H", "64", "--quiet"]
    outs = {}
    for label, extra in (("none", []),
                         ("cn", ["--controlnet", str(folder), "--control-image", str(tmp_path / "hint.png"),
                                 "--control-strength", "0.7", "--control-mode", "prompt"])):
        rc, _, err = run_cli(*common, "-o", str(tmp_path / f"{label}.png"), *extra)
        assert rc == 0, err
        outs[label] = Image.open(tmp_path / f"{label}.png").tobytes()
    assert outs["none"] != outs["cn"]
    rc, _, err = run_cli(*common, "-o", str(tmp_path / "canny.png"), "--controlnet", str(folder),
                         "--control-image", str(tmp_path / "hint.png"), "--preprocess", "canny")
    assert rc == 0, err
    assert Image.open(tmp_path / "canny.png").tobytes() not in (outs["none"], outs["cn"])
    rc, _, err = run_cli(*common, "--controlnet", str(folder), "--control-image",
                         str(tmp_path / "hint.png"), "--preprocess", "depth")
    assert_one_line_error(rc, err, "unknown preprocessor 'depth'")
    rc, _, err = run_cli(*common, "--controlnet", str(folder))
    assert_one_line_error(rc, err, "1 --controlnet but 0 --control-image")
    rc, _, err = run_cli(*common, "--control-image", str(tmp_path / "hint.png"))
    assert_one_line_error(rc, err, "needs --controlnet")
    rc, _, err = run_cli(*common, "--controlnet", str(folder), "--control-image",
                         str(tmp_path / "hint.png"), "--control-mode", "loud")
    assert_one_line_error(rc, err, "unknown control mode")
