"""ONNX export and the ONNX Runtime backend against sdfast's torch runtime.

Models: the built-in model (SD1 layout) and a random SD2-shaped model with a ControlNet (linear
projections, OpenCLIP text tower with its fused q/k/v). Tolerances: fp32 graphs compute the same
reference ops in another order (ONNX Runtime's kernels), so outputs agree to a relative 1e-4
of their magnitude (observed ~1e-6); fp16 tolerances are earned from torch's own fp16 error.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import sdfast
from _exports import builtin_export, relative_error, unet_inputs
from _pipelines import make_reference, save_single_file
from sdfast.cli import main
from sdfast.errors import SdfastError
from sdfast.export import export_onnx
from sdfast.export.graphs import _down
from test_controlnet import hint_image, random_controlnet
from test_lora import random_kohya_lora

FP32_REL = 1e-4
PROMPT = "a large red circle at the top left on a blue background"
LONG = ", ".join(["a small green triangle next to a yellow square"] * 9)     # > 75 tokens


@pytest.fixture(scope="module")
def builtin():
    return sdfast.load(None), sdfast.load(builtin_export(), backend="onnxruntime")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd2_export")
    ref = make_reference("small_sd2", tmp)
    single = save_single_file(ref, "sd2", tmp / "model.safetensors")
    net = random_controlnet(ref)
    net.save_pretrained(str(tmp / "edges"))
    out = tmp / "onnx"
    export_onnx(single, out, controlnets=[tmp / "edges"])
    return {"ref": ref, "single": single, "controlnet": tmp / "edges", "onnx": out,
            "torch": sdfast.load(single), "ort": sdfast.load(out, backend="onnxruntime"),
            "tmp": tmp}


def _pair(request, which):
    if which == "builtin":
        return request.getfixturevalue("builtin")
    setup = request.getfixturevalue("sd2")
    return setup["torch"], setup["ort"]


@pytest.mark.parametrize("which", ["builtin", "sd2"])
def test_unet_matches_torch_at_two_sizes_and_prompt_lengths(request, which):
    pt, po = _pair(request, which)
    for height, width in ((8, 8), (13, 10)):
        for tokens in (77, 154):
            x, t, ctx = unet_inputs(pt.unet.config, 2, height, width, tokens)
            with torch.no_grad():
                ref = pt.unet(x, t, ctx)
            out = po.unet(x, t, ctx)
            assert out.shape == ref.shape
            assert relative_error(out, ref) < FP32_REL, (height, width, tokens)


@pytest.mark.parametrize("which", ["builtin", "sd2"])
def test_text_encoder_and_vae_match_torch(request, which):
    pt, po = _pair(request, which)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 49000, (3, 77), generator=gen)
    for clip_skip in (1, 2):
        with torch.no_grad():
            ref = pt.text_encoder(ids, clip_skip=clip_skip)
        assert relative_error(po.text_encoder(ids, clip_skip=clip_skip), ref) < FP32_REL
    embeds = torch.randn(3, 77, pt.text_encoder.config.width, generator=gen) * 0.02
    with torch.no_grad():
        ref = pt.text_encoder(inputs_embeds=embeds, clip_skip=1)
    assert relative_error(po.text_encoder(inputs_embeds=embeds), ref) < FP32_REL
    with pytest.raises(ValueError):                                 # the torch model's check
        po.text_encoder(ids, clip_skip=99)
    for height, width in ((8, 8), (10, 7)):
        latent = torch.randn(2, 4, height, width, generator=gen)
        with torch.no_grad():
            ref = pt.vae.decode(latent)
        assert relative_error(po.vae.decode(latent), ref) < FP32_REL
        image = torch.rand(1, 3, height * 8, width * 8, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = pt.vae.encode(image).mean
        assert relative_error(po.vae.encode(image).mean, ref) < FP32_REL


def test_generate_matches_torch_backend(builtin):
    """A full 4-step generate (CFG, a two-chunk prompt, batch 2, non-square) from the same noise."""
    pt, po = builtin
    noise = torch.randn(2, 4, 10, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(negative_prompt="blurry", width=64, height=80, steps=4, cfg=6.0, noise=noise,
              sampler="euler_ancestral", seed=[5, 6], progress=False)
    lat_t = pt.generate([PROMPT, LONG], output="latent", **kw)
    lat_o = po.generate([PROMPT, LONG], output="latent", **kw)
    assert relative_error(lat_o, lat_t) < FP32_REL
    img_t, img_o = pt.decode_latents(lat_t), po.decode_latents(lat_o)
    # images in 0..1; the torch runtime's 3x3 convolutions run Winograd on the cpu (rms error up
    # to WINOGRAD_ERROR_FACTOR x the direct convolution's, tests/test_conv.py), the graph's are
    # direct: measured 1.2e-4 after 4 steps and the decoder, 1e-4 without Winograd
    assert (img_o - img_t).abs().max().item() < 5e-4
    pil = po.generate(PROMPT, steps=2, seed=1, progress=False)
    assert pil[0].size == tuple(pt.native_size)


def test_fp16_export_through_the_cli(tmp_path):
    """`sdfast export onnx --dtype fp16` (the default, built-in model). Bound earned as in
    flash-attention's tests: the fp16 graph may be off the fp32 result by at most twice torch's
    own fp16 error, plus a little for ONNX Runtime's different fp16 summation order."""
    out = tmp_path / "fp16"
    assert main(["export", "onnx", "-o", str(out), "--dtype", "fp16"]) == 0
    po = sdfast.load(out, backend="onnxruntime")
    assert po.dtype == torch.float16 and po.manifest["dtype"] == "fp16"
    graphs = po.manifest["graphs"]
    assert graphs["unet"]["inputs"]["sample"]["dtype"] == "float16"
    assert graphs["vae_decoder"]["inputs"]["latent"]["dtype"] == "float32"
    assert graphs["text_encoder"]["inputs"]["inputs_embeds"]["dtype"] == "float32"
    p32, p16 = sdfast.load(None), sdfast.load(None, device="cpu", dtype=torch.float16)
    for height, width in ((8, 8), (12, 10)):
        x, t, ctx = unet_inputs(p32.unet.config, 2, height, width, 154)
        with torch.no_grad():
            ref = p32.unet(x, t, ctx).double()
            torch16 = p16.unet(x.half(), t, ctx.half()).double()
        out16 = po.unet(x.half(), t, ctx.half()).double()
        assert out16.dtype == torch.float64 and torch.isfinite(out16).all()
        bound = 2 * (torch16 - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        assert (out16 - ref).abs().max().item() <= bound


def test_graphs_pass_the_checker_with_dynamic_axes_and_a_manifest(builtin):
    _, po = builtin
    folder = builtin_export()
    manifest = po.manifest
    assert manifest["format"] == "sdfast-onnx" and manifest["family"] == "sd1"
    assert manifest["prediction"] == "eps" and manifest["native_size"] == [64, 64]
    unet = manifest["graphs"]["unet"]
    assert unet["inputs"]["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert unet["inputs"]["context"]["shape"] == ["batch", "sequence", 64]
    assert unet["external_data"] == "unet.onnx.data"
    params = dict(po.unet.named_parameters())
    assert set(unet["refit"]) == set(params)                        # every weight refittable
    for stage, graph in manifest["graphs"].items():
        onnx.checker.check_model(str(folder / graph["file"]))
        model = onnx.load(str(folder / graph["file"]), load_external_data=False)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
        # sdfast's custom ops were traced as their references: only standard ONNX operators
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, stage


def test_external_data_past_the_threshold(builtin, tmp_path):
    from sdfast.export.graphs import VAEDecoderGraph
    from sdfast.export.onnx_export import _export_graph

    pt, _ = builtin
    path = tmp_path / "vae_decoder.onnx"
    small = _export_graph(VAEDecoderGraph(pt.vae), torch.float32, str(path), 17, 10 ** 9)
    assert small["external_data"] is None and not os.path.exists(f"{path}.data")
    big = _export_graph(VAEDecoderGraph(pt.vae), torch.float32, str(path), 17, 1000)
    assert big["external_data"] == "vae_decoder.onnx.data"
    assert os.path.getsize(path) < 200_000 < os.path.getsize(f"{path}.data")
    latent = torch.randn(1, 4, 8, 8)
    out = ort.InferenceSession(str(path)).run(None, {"latent": latent.numpy()})[0]
    with torch.no_grad():
        assert relative_error(torch.from_numpy(out), pt.vae.decode(latent)) < FP32_REL


def test_lora_refit_map_equals_the_torch_merge(sd2):
    """The refit weights come from the torch runtime's own merge (bit-identical); applied to
    the ONNX initializers by name, onnxruntime equals the torch runtime with that LoRA."""
    pt, po = sdfast.load(sd2["single"]), sdfast.load(sd2["onnx"], backend="onnxruntime")
    lora_a, lora_b = sd2["tmp"] / "a.safetensors", sd2["tmp"] / "b.safetensors"
    save_file(random_kohya_lora(sd2["ref"], seed=1), str(lora_a))
    save_file(random_kohya_lora(sd2["ref"], seed=2), str(lora_b))
    x, t, ctx = unet_inputs(pt.unet.config, 2, 8, 8, 77)
    ids = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(0))
    base_unet, base_text = po.unet(x, t, ctx), po.text_encoder(ids)

    pt.load_lora(lora_a, 0.7)
    po.load_lora(lora_a, 0.7)
    refit = po.refit_weights()
    for stage, module in (("unet", pt.unet), ("text_encoder", pt.text_encoder)):
        params = dict(module.named_parameters())
        assert refit[stage], stage
        for name, tensor in refit[stage].items():
            assert torch.equal(tensor, params[name[len(stage) + 1:]]), name
    assert any(n.endswith("attn.in_proj_weight") for n in refit["text_encoder"])   # fused q/k/v

    with torch.no_grad():
        ref_unet, ref_text = pt.unet(x, t, ctx), pt.text_encoder(ids)
    effect = (ref_unet - base_unet).abs().max().item()
    assert effect > 1e-2
    options = ort.SessionOptions()
    names = list(refit["unet"])
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(refit["unet"][n].numpy())
                                              for n in names])
    session = ort.InferenceSession(str(sd2["onnx"] / "unet.onnx"), options)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy()}
    for name, (channels, down) in zip(po.unet.control_inputs, po.unet.residuals):
        side = _down(8, down)
        feeds[name] = np.zeros((2, channels, side, side), np.float32)     # no ControlNet acting
    hand = torch.from_numpy(session.run(None, feeds)[0])
    out_unet, out_text = po.unet(x, t, ctx), po.text_encoder(ids)
    assert relative_error(out_unet, ref_unet) < FP32_REL
    assert relative_error(out_text, ref_text) < FP32_REL
    assert relative_error(hand, ref_unet) < FP32_REL

    po.unload_lora("a")
    assert torch.equal(po.unet(x, t, ctx), base_unet) and torch.equal(po.text_encoder(ids), base_text)
    assert po.refit_weights() == {}
    po.load_lora(lora_a, 0.7)
    po.unload_lora("a")
    po.load_lora(lora_b, 0.5)                                   # A then B: B alone, no blend
    only_b = sdfast.load(sd2["onnx"], backend="onnxruntime")
    only_b.load_lora(lora_b, 0.5)
    assert torch.equal(po.unet(x, t, ctx), only_b.unet(x, t, ctx))
    pt.unload_lora("a")
    pt.load_lora(lora_b, 0.5)
    with torch.no_grad():
        assert relative_error(po.unet(x, t, ctx), pt.unet(x, t, ctx)) < FP32_REL


def test_controlnet_graph_and_generate_match_torch(sd2):
    pt, po = sd2["torch"], sd2["ort"]
    assert list(po.controlnets) == ["edges"]
    net_t = sdfast.load_controlnet(sd2["controlnet"])
    net_o = po.controlnets["edges"]
    x, t, ctx = unet_inputs(pt.unet.config, 2, 8, 8, 154)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = net_t(x, hint, t, ctx)
    out = net_o(x, hint, t, ctx)
    assert len(out) == len(ref) == len(po.unet.control_inputs)
    for a, b in zip(out, ref):
        assert relative_error(a, b) < FP32_REL
    kw = dict(steps=4, seed=3, width=64, height=64, output="latent", progress=False)
    image = hint_image()
    lat_t = pt.generate(PROMPT, control=sdfast.Control(net_t, image, strength=0.8, mode="prompt"), **kw)
    lat_o = po.generate(PROMPT, control=sdfast.Control(net_o, image, strength=0.8, mode="prompt"), **kw)
    plain = po.generate(PROMPT, **kw)
    assert (lat_o - plain).abs().max().item() > 1e-2                  # the control acts
    assert relative_error(lat_o, lat_t) < FP32_REL


def test_control_needs_residual_inputs(builtin, sd2):
    _, po = builtin
    net = sd2["ort"].controlnets["edges"]
    with pytest.raises(SdfastError, match="no ControlNet inputs|another architecture|wide"):
        po.generate(PROMPT, steps=1, progress=False, control=sdfast.Control(net, hint_image()))


def test_bad_loads_and_exports_are_one_line_errors(builtin, tmp_path, capsys):
    folder = builtin_export()
    with pytest.raises(SdfastError, match="dtype"):
        sdfast.load(folder, backend="onnxruntime", dtype=torch.float16)
    with pytest.raises(SdfastError, match="no manifest.json"):
        sdfast.load(tmp_path, backend="onnxruntime")
    with pytest.raises(SdfastError, match="sdfast-onnx export, not sdfast-tensorrt"):
        sdfast.load(folder, backend="tensorrt")
    with pytest.raises(SdfastError, match="unknown backend"):
        sdfast.load(folder, backend="openvino")
    for argv, message in (
            (["export", "onnx", "-o", str(folder)], "exists (pass --overwrite"),
            (["export", "onnx", "-o", str(tmp_path / "x"), "--opset", "16"], "opset must be"),
            (["export", "onnx", "-o", str(tmp_path / "x"), "--dtype", "bf16"], "dtype must be"),
            (["export", "onnx", "-o", str(tmp_path / "x"), "--model", str(tmp_path / "no")],
             "no such file"),
            (["export", "onnx", "-o", str(tmp_path / "x"), "--controlnet", str(tmp_path / "no")],
             "no such ControlNet")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sd15_sized_unet_goes_past_2gb_into_external_data(tmp_path):
    """A real SD1.5-shaped UNet (860M parameters, 3.4 GB in fp32, random weights): the graph
    file stays small, the weights go to one external data file, and it still matches torch."""
    from sdfast.export.graphs import UNetGraph
    from sdfast.export.onnx_export import PROTOBUF_LIMIT, _export_graph
    from sdfast.models.unet import UNetConfig, UNetModel

    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).eval()
    path = tmp_path / "unet.onnx"
    written = _export_graph(UNetGraph(unet), torch.float32, str(path), 17, PROTOBUF_LIMIT)
    assert written["external_data"] == "unet.onnx.data"
    assert os.path.getsize(path) < 2 ** 24 and os.path.getsize(f"{path}.data") > 2 ** 31
    x, t, ctx = unet_inputs(unet.config, 2, 8, 8, 77)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy()})[0]
    with torch.no_grad():
        assert relative_error(torch.from_numpy(out), unet(x, t, ctx)) < FP32_REL
