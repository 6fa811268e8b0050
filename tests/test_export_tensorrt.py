"""TensorRT: everything up to the TensorRT call runs here (profile computation, the
out-of-profile error, the profile check in front of a runner, the CLI's missing-TensorRT error);
the engine build, run and refit tests need `tensorrt` and a CUDA device and skip elsewhere."""
import importlib.util

import pytest
import torch

import sdfast
from _exports import builtin_export, relative_error
from sdfast.cli import main
from sdfast.errors import SdfastError
from sdfast.export import manifest as mf
from sdfast.export.graphs import _down, residual_specs
from sdfast.export.ort import OnnxInitializers, OrtRunner
from sdfast.export.profiles import (BuildShapes, ProfileChecked, check_shapes, compute_profiles,
                                    default_shapes, parse_batch, parse_size)
from sdfast.export.runtime import build_pipeline

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "tensorrt is not installed here (it needs an NVIDIA GPU); the engine tests run where it imports"
SHAPES = BuildShapes((256, 256), (512, 512), (768, 1024), (1, 2, 4), 3)


@pytest.fixture(scope="module")
def manifest():
    return mf.read(builtin_export(), "sdfast-onnx")


def _with_controls(manifest):
    """The built-in manifest as if exported with ControlNet residual inputs."""
    config = mf.unet_config(manifest["configs"]["unet"])
    out = {**manifest, "residuals": [list(r) for r in residual_specs(config)]}
    unet = dict(out["graphs"]["unet"])
    unet["inputs"] = {**unet["inputs"], **{f"control_{i}": {} for i in range(len(out["residuals"]))}}
    out["graphs"] = {**out["graphs"], "unet": unet}
    return out


def test_profiles_for_given_sizes(manifest):
    p = compute_profiles(manifest, SHAPES)
    assert set(p) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    # UNet: batch MIN .. 2*OPT .. 2*MAX (CFG), latents W/8 x H/8 (H first), 1..1..3 chunks.
    assert p["unet"]["sample"] == ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 128, 96))
    assert p["unet"]["timestep"] == ((1,), (4,), (8,))
    assert p["unet"]["context"] == ((1, 77, 64), (4, 77, 64), (8, 231, 64))
    # Text: every distinct chunk of prompts and negatives plus the empty chunk, 77 tokens.
    assert p["text_encoder"]["input_ids"] == ((1, 77), (5, 77), (25, 77))
    assert p["text_encoder"]["inputs_embeds"][2] == (25, 77, 64)
    assert "clip_skip" not in p["text_encoder"]                      # static: no profile
    assert p["vae_decoder"]["latent"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 96))
    assert p["vae_encoder"]["image"] == ((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 768))


def test_residual_profiles_follow_the_controlnet_shapes(manifest):
    """The residual inputs' shapes are each level's ceil-halved size: checked against what
    sdfast's torch ControlNet returns at an odd latent size."""
    from sdfast.models.controlnet import ControlNetModel, controlnet_config_from_unet

    shapes = BuildShapes((104, 80), (104, 80), (200, 264), (1, 1, 1), 1)
    p = compute_profiles(_with_controls(manifest), shapes)
    config = mf.unet_config(manifest["configs"]["unet"])
    net = ControlNetModel(controlnet_config_from_unet(config)).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 4, 33, 25), torch.rand(1, 3, 264, 200), torch.tensor([3.0]),
                   torch.randn(1, 77, config.context_dim))
    assert len(outs) == len(residual_specs(config)) == 9
    for i, out in enumerate(outs):
        assert p["unet"][f"control_{i}"][2] == (2,) + tuple(out.shape[1:]), i
        assert p["unet"][f"control_{i}"][0][2:] == (_down(10, residual_specs(config)[i][1]),
                                                    _down(13, residual_specs(config)[i][1]))


def test_build_shapes_are_checked():
    assert parse_size("512x768") == (512, 768) and parse_size("640") == (640, 640)
    assert parse_batch("1:2:4") == (1, 2, 4) and parse_batch("3") == (1, 3, 3)
    assert default_shapes([64, 64]) == BuildShapes((32, 32), (64, 64), (96, 96))
    for bad in ("512by512", "1x2x3", ""):
        with pytest.raises(SdfastError, match="WIDTHxHEIGHT"):
            parse_size(bad)
    with pytest.raises(SdfastError, match="MIN:OPT:MAX"):
        parse_batch("1:2")
    with pytest.raises(SdfastError, match="multiples of 8"):
        BuildShapes((250, 256), (512, 512), (768, 768))
    with pytest.raises(SdfastError, match="min <= opt <= max"):
        BuildShapes((512, 512), (256, 512), (768, 768))
    with pytest.raises(SdfastError, match="MIN <= OPT <= MAX"):
        BuildShapes((256, 256), (512, 512), (768, 768), (2, 1, 4))
    with pytest.raises(SdfastError, match="max-chunks"):
        BuildShapes((256, 256), (512, 512), (768, 768), (1, 1, 1), 0)


def test_out_of_profile_is_a_one_line_error(manifest):
    profile = compute_profiles(manifest, SHAPES)["unet"]
    check_shapes(profile, {"sample": (2, 4, 64, 48), "context": (2, 154, 64)}, "unet.engine", SHAPES)
    with pytest.raises(SdfastError) as err:
        check_shapes(profile, {"sample": (2, 4, 160, 64)}, "unet.engine", SHAPES)
    message = str(err.value)
    assert "\n" not in message
    assert "unet.engine: input sample of shape [2, 4, 160, 64]" in message
    assert "[1..8 x 4 x 32..128 x 32..96]" in message
    assert "built for images 256x256 to 768x1024, batch 1 to 4" in message
    with pytest.raises(SdfastError, match="input context of shape \\[2, 308, 64\\]"):
        check_shapes(profile, {"context": (2, 308, 64)}, "unet.engine", SHAPES)


def test_a_profile_checked_pipeline_runs_inside_and_refuses_outside(manifest):
    """sdfast's Pipeline over runners checked against profiles (ONNX Runtime standing in for
    the engines): inside the profiles it gives the plain ONNX Runtime result, outside it stops
    with the one-line error before running the graph."""
    folder = builtin_export()
    shapes = BuildShapes((32, 32), (64, 64), (64, 96), (1, 1, 2), 1)
    profiles = compute_profiles(manifest, shapes)
    graphs = manifest["graphs"]

    def make_runner(key, spec):
        return ProfileChecked(OrtRunner(str(folder / spec["file"]), ["CPUExecutionProvider"]),
                              profiles[key], f"{key}.engine", shapes)

    pipe = build_pipeline(folder, manifest, make_runner,
                          lambda stage: OnnxInitializers(str(folder / graphs[stage]["file"])),
                          torch.device("cpu"), "tensorrt")
    plain = sdfast.load(folder, backend="onnxruntime")
    kw = dict(steps=2, seed=4, output="latent", progress=False)
    assert torch.equal(pipe.generate("a red circle", width=64, height=96, **kw),
                       plain.generate("a red circle", width=64, height=96, **kw))
    for request, name in ((dict(width=128, height=64), "sample"),
                          (dict(batch_size=3), "input_ids|sample"),
                          (dict(prompt=", ".join(["a red circle"] * 40)), "context")):
        prompt = request.pop("prompt", "a red circle")
        with pytest.raises(SdfastError, match=f"engine: input ({name}) of shape") as err:
            pipe.generate(prompt, **request, **kw)
        assert "\n" not in str(err.value) and "sdfast export tensorrt" in str(err.value)


def test_a_lora_on_weights_an_engine_cannot_refit_is_refused(manifest, tmp_path):
    """Engines built without --refit list every weight as `fixed`: a LoRA is a clear error
    (never a silent no-op), and the weights stay the base ones."""
    from safetensors.torch import save_file

    folder = builtin_export()
    fixed = {**manifest, "graphs": {**manifest["graphs"]}}
    fixed["graphs"]["unet"] = {**manifest["graphs"]["unet"],
                               "fixed": sorted(manifest["graphs"]["unet"]["refit"])}
    pipe = build_pipeline(folder, fixed,
                          lambda key, spec: OrtRunner(str(folder / spec["file"]), ["CPUExecutionProvider"]),
                          lambda stage: OnnxInitializers(str(folder / manifest["graphs"][stage]["file"])),
                          torch.device("cpu"), "tensorrt")
    weight = dict(pipe.unet.named_parameters())["input_blocks.1.1.proj_in.weight"]
    path = tmp_path / "one.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, *weight.shape[1:]),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(weight.shape[0], 2, 1, 1)},
              str(path))
    with pytest.raises(SdfastError, match="cannot refit .*build the engines with --refit"):
        pipe.load_lora(path)
    assert pipe.loras == {} and pipe.refit_weights() == {}


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed: the missing-tensorrt error cannot occur")
def test_cli_without_tensorrt_exits_2(tmp_path, capsys):
    assert main(["export", "tensorrt", "--onnx", str(builtin_export()), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorrt is not installed" in err
    assert not (tmp_path / "e").exists()


def test_cli_checks_the_arguments_before_looking_for_tensorrt(tmp_path, capsys):
    """Bad shapes or a missing export are reported as such, with or without TensorRT."""
    out = str(tmp_path / "e")
    assert main(["export", "tensorrt", "--onnx", str(tmp_path / "none"), "-o", out]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["export", "tensorrt", "--onnx", str(builtin_export()), "-o", out,
                 "--min", "64x64", "--max", "32x32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min <= opt <= max" in err, err
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- with TensorRT and CUDA
needs_trt = pytest.mark.skipif(not HAVE_TRT or not torch.cuda.is_available(),
                               reason=NO_TRT if not HAVE_TRT else "TensorRT needs a CUDA device")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from sdfast.export.tensorrt import build_engines

    out = tmp_path_factory.mktemp("engines")
    build_engines(builtin_export(), out, BuildShapes((32, 32), (64, 64), (96, 96), (1, 1, 2), 2),
                  refit=True)
    return out


@needs_trt
@pytest.mark.gpu
def test_engines_generate_like_onnxruntime(engines):
    pipe = sdfast.load(engines, backend="tensorrt")
    plain = sdfast.load(builtin_export(), backend="onnxruntime")
    kw = dict(steps=4, seed=2, output="latent", progress=False, width=64, height=96)
    assert relative_error(pipe.generate("a red circle", **kw).cpu(),
                          plain.generate("a red circle", **kw)) < 1e-3      # TF32 / tactic choice
    with pytest.raises(SdfastError, match="outside the engine's profile"):
        pipe.generate("a red circle", steps=1, width=128, height=128, progress=False)


@needs_trt
@pytest.mark.gpu
def test_refit_lora_matches_torch_and_unload_returns_the_base(engines, tmp_path):
    from safetensors.torch import save_file

    pt, pipe = sdfast.load(None, device="cpu"), sdfast.load(engines, backend="tensorrt")
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name, p in pt.unet.named_parameters():
        if "transformer_blocks" in name and name.endswith(".weight") and p.dim() == 2:
            module = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
            lora[f"{module}.lora_down.weight"] = torch.randn(4, p.shape[1], generator=gen) * 0.1
            lora[f"{module}.lora_up.weight"] = torch.randn(p.shape[0], 4, generator=gen) * 0.1
    path = tmp_path / "a.safetensors"
    save_file(lora, str(path))
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t, ctx = torch.tensor([500.0, 20.0]), torch.randn(2, 77, 64, generator=gen)
    base = pipe.unet(x.cuda(), t.cuda(), ctx.cuda()).cpu()
    with torch.no_grad():
        base_ref = pt.unet(x, t, ctx)
    pt.load_lora(path, 0.8)
    pipe.load_lora(path, 0.8)
    with torch.no_grad():
        ref = pt.unet(x, t, ctx)
    # The LoRA has an effect (as in tests/test_export.py), far above the 1e-3 tolerance below:
    # an engine left unrefitted would fail it (measured on CPU, torch: max change 0.19, 0.045
    # relative).
    assert (ref - base_ref).abs().max().item() > 1e-2
    assert relative_error(base_ref, ref) > 1e-2
    assert relative_error(pipe.unet(x.cuda(), t.cuda(), ctx.cuda()).cpu(), ref) < 1e-3
    pipe.unload_lora("a")
    assert torch.equal(pipe.unet(x.cuda(), t.cuda(), ctx.cuda()).cpu(), base)
