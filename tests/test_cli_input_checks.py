"""Bad input on the command line (and the Python API behind it): one line on stderr, exit 2,
no traceback, nothing written, and where possible no model loaded. Runs the CLI in-process
with the built-in model (the default)."""
import errno
import json
import os
import re

import pytest
import torch
from PIL import Image

from _fixtures import lock
import sdfast
from sdfast.cli import _Parser, main, run_parser
from sdfast.errors import SdfastError

GEN = ["generate", "--prompt", "x", "--quiet"]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc, err, pattern):
    """Exit 2, exactly one `sdfast: error: ...` line matching the regex `pattern`."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("sdfast: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded: these checks must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(sdfast, "load", boom)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe():
    return sdfast.load(device="cpu")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- A: OSError
def _parser_raising(exc):
    parser = _Parser(prog="sdfast")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def fail(args):
        raise exc

    sub.add_parser("go").set_defaults(func=fail)
    return parser


@pytest.mark.parametrize("exc, pattern", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/in.png"),
     r"^sdfast: error: /data/in\.png: Permission denied$"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), r"/data: Is a directory$"),
    (OSError(errno.ENOSPC, "No space left on device"), r"error: No space left on device$"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"),
     r"/a -> /b: Invalid cross-device link$"),
])
def test_os_errors_are_one_line_naming_the_file(capsys, exc, pattern):
    rc = run_parser(_parser_raising(exc), ["go"])
    assert_error(rc, capsys.readouterr().err, pattern)


def test_programming_errors_still_raise():
    with pytest.raises(RuntimeError):
        run_parser(_parser_raising(RuntimeError("a bug")), ["go"])


# ----------------------------------------------------------------------------- B: --device
@pytest.mark.parametrize("device, pattern", [
    ("foo", r"--device foo: not a device"),
    ("cuda:-1", r"--device cuda:-1: not a device"),
    ("meta", r"--device meta: sdfast does not run on 'meta' devices"),
])
def test_bad_device_fails_before_loading(capsys, tmp_path, no_load, device, pattern):
    rc, _, err = run(capsys, *GEN, "--device", device, "-o", tmp_path / "o.png")
    assert_error(rc, err, pattern)
    assert _files(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_loading(capsys, tmp_path, no_load):
    for device in ("cuda", "cuda:1"):
        rc, _, err = run(capsys, *GEN, "--device", device, "-o", tmp_path / "o.png")
        assert_error(rc, err, rf"--device {device}: no CUDA device is available here")
    with pytest.raises(SdfastError, match="device cuda: no CUDA device"):
        sdfast.check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    count = torch.cuda.device_count()
    with pytest.raises(SdfastError, match="index out of range"):
        sdfast.check_device(f"cuda:{count}")


def test_api_load_refuses_a_bad_device():
    with pytest.raises(SdfastError, match="device foo: not a device"):
        sdfast.load(device="foo")
    assert sdfast.check_device("cpu") == torch.device("cpu")


# ----------------------------------------------------------------------------- C: --clip-skip
def test_clip_skip_above_the_text_encoders_layers(capsys, tmp_path):
    rc, _, err = run(capsys, *GEN, "--steps", "1", "--clip-skip", "99", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"clip_skip 99 is out of range: this model's text encoder takes 1 to "
                          r"4$")      # the built-in model's text encoder has 4 layers
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------- D: --seed
@pytest.mark.parametrize("seed", [str(2 ** 64), str(-2 ** 63 - 1), str(10 ** 30)])
def test_out_of_range_seeds_fail_before_loading(capsys, tmp_path, no_load, seed):
    rc, _, err = run(capsys, *GEN, "--seed", seed, "-o", tmp_path / "o.png")
    assert_error(rc, err, rf"--seed {seed} is out of range: seeds are -9223372036854775808 to "
                          r"18446744073709551615 \(-1: a random seed\)")
    assert _files(tmp_path) == []


def test_prompts_file_last_seed_is_checked(capsys, tmp_path, no_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "generate", "--prompts-file", prompts, "--seed", 2 ** 64 - 2,
                     "-o", out / "o.png")
    assert_error(rc, err, r"the last prompt's seed \(seed \+ 2 = 18446744073709551616\) is "
                          r"above the largest seed")
    assert not out.exists()


def test_seed_minus_one_is_random_printed_and_recorded(capsys, tmp_path):
    seeds = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        rc, stdout, err = run(capsys, *GEN, "--steps", "1", "--seed", "-1", "-o", out)
        assert rc == 0, err
        assert stdout.split() == [str(out)]
        match = re.search(r"random seed (\d+)", err)
        assert match, err
        with Image.open(out) as img:
            params = img.text["parameters"]
        assert f", Seed: {match[1]}," in params
        seeds.append(int(match[1]))
    assert seeds[0] != seeds[1]              # 1 in 2**32 to collide


def test_api_seed_minus_one_and_range(pipe):
    a = pipe.generate("x", steps=1, seed=-1, output="tensor", progress=False)
    first = pipe.last_seed
    assert isinstance(first, int) and 0 <= first < 2 ** 32
    b = pipe.generate("x", steps=1, seed=first, output="tensor", progress=False)
    assert torch.equal(a, b) and pipe.last_seed == first
    pipe.generate("x", steps=1, seed=[3, -1], output="tensor", progress=False)
    assert pipe.last_seed[0] == 3 and pipe.last_seed[1] != -1
    for bad in (2 ** 64, -2 ** 63 - 1):
        with pytest.raises(SdfastError, match="out of range"):
            pipe.generate("x", steps=1, seed=bad, progress=False)
    with pytest.raises(SdfastError, match=r"seed\[1\] .* out of range"):
        pipe.generate("x", steps=1, seed=[0, 2 ** 64], progress=False)
    with pytest.raises(SdfastError, match="must be an integer"):
        pipe.generate("x", steps=1, seed=1.5, progress=False)


# ----------------------------------------------------------------------------- E: ignored options
def test_cache_depth_without_cache_interval(capsys, tmp_path, no_load):
    rc, _, err = run(capsys, *GEN, "--cache-depth", "2", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"--cache-depth needs --cache-interval$")


def test_strength_without_init_image(capsys, tmp_path, no_load):
    rc, _, err = run(capsys, *GEN, "--strength", "0.5", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"--strength needs --init-image")


@pytest.mark.parametrize("name", ["out.jpg", "out.webp", "out.JPEG"])
def test_non_png_output_names_are_refused(capsys, tmp_path, no_load, name):
    rc, _, err = run(capsys, *GEN, "-o", tmp_path / name)
    assert_error(rc, err, r"sdfast writes PNG images \(name the output \.png\)")
    assert _files(tmp_path) == []


def test_output_that_is_a_folder_is_refused(capsys, tmp_path, no_load):
    rc, _, err = run(capsys, *GEN, "-o", tmp_path)
    assert_error(rc, err, r"is a folder \(give a file name")
    assert _files(tmp_path) == []


def test_init_image_with_default_strength_still_works(capsys, tmp_path, png):
    out = tmp_path / "o.png"
    rc, _, err = run(capsys, *GEN, "--steps", "2", "--init-image", png, "-o", out)
    assert rc == 0, err
    with Image.open(out) as img:
        assert "Denoising strength: 0.75" in img.text["parameters"]


# ----------------------------------------------------------------------------- F: numbers
@pytest.mark.parametrize("args, pattern", [
    (["--cfg", "nan"], r"argument --cfg: expected a finite number, got 'nan'"),
    (["--cfg", "inf"], r"argument --cfg: expected a finite number, got 'inf'"),
    (["--cfg=-inf"], r"argument --cfg: expected a finite number"),
    (["-W", "20000"], r"width 20000 is too large \(at most 16384\)"),
    (["-H", "1048576"], r"height 1048576 is too large \(at most 16384\)"),
])
def test_non_finite_and_absurd_numbers_fail_before_loading(capsys, tmp_path, no_load, args,
                                                             pattern):
    rc, _, err = run(capsys, *GEN, *args, "-o", tmp_path / "o.png")
    assert_error(rc, err, pattern)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("strength", ["1e-12", "0.0009", "nan", "0"])
def test_tiny_or_nan_strength_is_refused(capsys, tmp_path, no_load, png, strength):
    rc, _, err = run(capsys, *GEN, "--init-image", png, "--strength", strength,
                     "-o", tmp_path / "o.png")
    assert_error(rc, err, r"strength")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("suffix", [":nan", ":inf", ":1:nan"])
def test_lora_strength_must_be_finite(capsys, tmp_path, no_load, suffix):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"not read before the check")
    rc, _, err = run(capsys, *GEN, "--lora", f"{lora}{suffix}", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"strengths must be finite numbers")


def test_control_strength_must_be_finite(capsys, tmp_path, no_load, png):
    net = tmp_path / "net.safetensors"
    net.write_bytes(b"x")
    rc, _, err = run(capsys, *GEN, "--controlnet", net, "--control-image", png,
                     "--control-strength", "nan", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"--control-strength: expected a finite number")


def test_api_numbers(pipe):
    from sdfast.addons.tags import parse_tag
    from sdfast.pipeline import check_request

    with pytest.raises(SdfastError, match="cfg must be a finite number"):
        pipe.generate("x", steps=1, cfg=float("nan"), progress=False)
    with pytest.raises(SdfastError, match="LoRA strengths must be finite"):
        pipe.load_lora("missing.safetensors", float("inf"))
    with pytest.raises(SdfastError, match="must be finite"):
        parse_tag("style:nan")
    with pytest.raises(SdfastError, match="strength must be in"):
        check_request(64, 64, 20, "euler", "normal", 1, 1e-12)
    with pytest.raises(SdfastError, match="at most 16384"):
        check_request(16392, 64, 20, "euler", "normal", 1, 1.0)
    check_request(16384, 64, 20, "euler", "normal", 1, 0.001)       # the limits themselves


# ----------------------------------------------------------------------------- G: atomic PNGs
class _FailingImage:
    """Writes part of a PNG, then fails like a full disk."""

    def save(self, fp, format=None, pnginfo=None):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_png_overwrite_keeps_the_old_image_when_the_write_fails(tmp_path):
    from sdfast.io.png import save_png

    path = tmp_path / "o.png"
    save_png(Image.new("RGB", (8, 8)), path, "first")
    before = path.read_bytes()
    with pytest.raises(SdfastError, match=r"o\.png: cannot write \(No space left on device\)"):
        save_png(_FailingImage(), path, "second", overwrite=True)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["o.png"]                      # no temporary file left
    save_png(Image.new("RGB", (8, 8), "white"), path, "third", overwrite=True)
    assert path.read_bytes() != before
    assert _files(tmp_path) == ["o.png"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_png_failed_new_write_leaves_no_file(tmp_path):
    from sdfast.io.png import save_png

    with pytest.raises(SdfastError, match="cannot write"):
        save_png(_FailingImage(), tmp_path / "o.png", "x")
    assert _files(tmp_path) == []


def test_png_never_replaces_a_file_that_appears_while_encoding(tmp_path):
    from sdfast.io.png import save_png

    path = tmp_path / "o.png"

    class Racing:
        def save(self, fp, format=None, pnginfo=None):
            path.write_bytes(b"someone else's")
            Image.new("RGB", (8, 8)).save(fp, format=format, pnginfo=pnginfo)

    with pytest.raises(SdfastError, match="exists"):
        save_png(Racing(), path, "x")
    assert path.read_bytes() == b"someone else's"
    assert _files(tmp_path) == ["o.png"]


def test_save_atomic_turns_os_errors_into_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    from sdfast.io.save import save_atomic

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SdfastError, match=r"m\.safetensors: cannot write \(No space left") as info:
        save_atomic({"w": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert isinstance(info.value, OSError)          # still an OSError for library callers
    assert _files(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(SdfastError, match=r"m\.safetensors: \S*file is not a folder$") as info:
        save_atomic({"w": torch.zeros(1)}, blocker / "m.safetensors")
    assert isinstance(info.value, OSError)
    assert blocker.read_text() == "keep"


# ----------------------------------------------------------------------------- H: lora merge -o
@pytest.mark.parametrize("name", ["merged.ckpt", "merged.pt", "merged.pth", "merged.bin",
                                  "merged"])
def test_lora_merge_output_must_be_safetensors(capsys, tmp_path, no_load, name):
    rc, _, err = run(capsys, "lora", "merge", "base", "l.safetensors", "-o", tmp_path / name)
    assert_error(rc, err, r"lora merge writes a safetensors file")
    assert _files(tmp_path) == []


def test_lora_merge_output_checks_before_loading(capsys, tmp_path, no_load):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    rc, _, err = run(capsys, "lora", "merge", "base", "l.safetensors", "-o", folder)
    assert_error(rc, err, r"is a folder")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"precious")
    rc, _, err = run(capsys, "lora", "merge", "base", "l.safetensors", "-o", taken)
    assert_error(rc, err, r"exists \(pass --overwrite to replace it\)")
    assert taken.read_bytes() == b"precious"
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    rc, _, err = run(capsys, "lora", "merge", "base", "l.safetensors",
                     "-o", blocker / "sub" / "m.safetensors")
    assert_error(rc, err, r"file\.txt is not a folder \(cannot create a folder under it\)")
    assert blocker.read_text() == "keep"


def test_lora_merge_output_folder_must_be_writable(capsys, tmp_path, no_load, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    lock(monkeypatch, locked)
    rc, _, err = run(capsys, "lora", "merge", "base", "l.safetensors", "-o", locked / "m.safetensors")
    assert_error(rc, err, r"locked is not writable")
    assert list(locked.iterdir()) == []


# ----------------------------------------------------------------------------- I: images
@pytest.mark.parametrize("kind", ["text", "folder"])
def test_preprocess_control_image_that_is_not_an_image(capsys, tmp_path, no_load, kind):
    net = tmp_path / "net.safetensors"
    net.write_bytes(b"x")
    image = tmp_path / "edges.png"
    if kind == "text":
        image.write_text("not an image")
    else:
        image.mkdir()
    rc, _, err = run(capsys, *GEN, "--controlnet", net, "--control-image", image,
                     "--preprocess", "canny", "-o", tmp_path / "o.png")
    pattern = "not a readable image" if kind == "text" else "is a folder, not an image"
    assert_error(rc, err, rf"edges\.png: {pattern}")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
def test_init_image_and_mask_that_are_not_images(capsys, tmp_path, no_load, png, flag):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["--init-image", bad] if flag == "--init-image" else ["--init-image", png,
                                                                  "--mask", bad]
    rc, _, err = run(capsys, *GEN, *args, "-o", tmp_path / "o.png")
    assert_error(rc, err, r"bad\.png: not a readable image")
    assert not (tmp_path / "o.png").exists()


def test_preprocess_api_names_the_file(tmp_path):
    from sdfast.addons.preprocess import preprocess

    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(SdfastError, match=r"t\.txt: not a readable image"):
        preprocess("canny", text)
    with pytest.raises(SdfastError, match="is a folder, not an image"):
        preprocess("binary", tmp_path)


# ----------------------------------------------------------------------------- J: ControlNet config
@pytest.mark.parametrize("text", ['{"in_channels": 4,', "[1, 2]", "\udcff"])
def test_diffusers_controlnet_with_broken_config(tmp_path, text):
    from safetensors.torch import save_file

    folder = tmp_path / "cn"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SdfastError) as info:
        sdfast.load_controlnet(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "config.json") + ": "), message
    json.dumps(message)


# ----------------------------------------------------------------------------- K: bare `lora`
def test_bare_lora_names_its_sub_command(capsys):
    rc, _, err = run(capsys, "lora")
    assert_error(rc, err, r"^sdfast: error: lora needs a sub-command: merge$")


def test_prompts_file_seeds_through_minus_one_stay_fixed(capsys, tmp_path):
    # --seed -2 over 3 prompts: -2, then -1 (the fixed seed torch takes as 2**64 - 1, not a
    # random one: only a --seed of -1 itself means random), then 0.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    rc, _, err = run(capsys, "generate", "--prompts-file", prompts, "--seed", "-2", "--steps", "1",
                     "--quiet", "-o", tmp_path / "o.png")
    assert rc == 0, err
    assert "random seed" not in err
    seeds = []
    for i in range(3):
        with Image.open(tmp_path / f"o-{i:05d}.png") as img:
            seeds.append(re.search(r"Seed: (-?\d+)", img.text["parameters"])[1])
    assert seeds == ["-2", str(2 ** 64 - 1), "0"]


# ----------------------------------------------------------------- a sweep of bad inputs (2)
def test_prompt_weights_that_are_not_finite_numbers_are_errors():
    from sdfast.text.prompt import parse_prompt_attention

    with pytest.raises(SdfastError, match=r"invalid emphasis weight '1\.2\.3'"):
        parse_prompt_attention("a (b:1.2.3)")
    for text, syntax in (("(a:nan)", "comfy"), ("(a:inf)", "comfy"), ("(a:1e400)", "comfy")):
        with pytest.raises(SdfastError, match="must be finite"):
            parse_prompt_attention(text, syntax)


def test_generate_prompt_weight_error_is_one_line(capsys, tmp_path):
    out = tmp_path / "o.png"
    rc, _, err = run(capsys, *GEN[:2], "a (b:1.2.3)", "--quiet", "--steps", "1", "-o", out)
    assert_error(rc, err, r"invalid emphasis weight")
    assert not out.exists()


def _builtin_state():
    from safetensors.torch import load_file

    from sdfast.builtin import resolve_model
    return load_file(resolve_model())


def test_checkpoint_tensor_of_the_wrong_shape_or_dtype_is_an_error(tmp_path):
    from safetensors.torch import save_file

    sd = _builtin_state()
    key = next(k for k in sd if k.endswith("attn1.to_q.weight"))
    for name, value, pattern in (("shape", sd[key][:-1].clone(), r"has shape \[\d+, \d+\], the "
                                  r"detected architecture needs"),
                                 ("dtype", sd[key].to(torch.int64), "is torch.int64, expected")):
        bad = dict(sd, **{key: value})
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(SdfastError, match=f"{name}.safetensors: UNet weight .*to_q.weight {pattern}"):
            sdfast.load(path)


def test_embeddings_that_cannot_fit_or_hold_nan_are_errors(tmp_path):
    from safetensors.torch import save_file

    from sdfast.addons.embeddings import read_embedding

    for name, vectors, pattern in (("long", torch.randn(76, 64), "has 76 vectors; a prompt chunk "
                                    "holds 1 to 75"),
                                   ("nan", torch.full((2, 64), float("nan")), "NaN or infinite")):
        save_file({"emb_params": vectors}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(SdfastError, match=pattern):
            read_embedding(tmp_path / f"{name}.safetensors")
    text = tmp_path / "text.pt"
    text.write_text("not an embedding")
    with pytest.raises(SdfastError, match=r"not an embedding file \(neither safetensors"):
        read_embedding(text)


def test_unknown_comfy_embedding_with_an_embeddings_folder_is_an_error(pipe, tmp_path):
    pipe.embeddings_dir = tmp_path                # an empty folder: nothing to find
    try:
        with pytest.raises(SdfastError, match="unknown embedding 'missing'"):
            pipe.encode_prompt("a embedding:missing cat", weighting="comfy")
    finally:
        pipe.embeddings_dir = None
    pipe.encode_prompt("a embedding:missing cat", weighting="comfy")   # no folder: text


def test_sampling_that_turns_non_finite_is_an_error_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "o.png"
    rc, _, err = run(capsys, *GEN, "--steps", "1", "--cfg", "1e30", "-o", out)
    assert_error(rc, err, "(sampling|decoding the latents) produced NaN or infinite values")
    assert not out.exists()


def test_lora_files_with_nan_bad_alpha_or_half_a_module_are_errors(pipe, tmp_path):
    from safetensors.torch import save_file

    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    kohya = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
    o, i = pipe.unet.get_parameter(name).shape
    good = {f"{kohya}.lora_down.weight": torch.randn(4, i), f"{kohya}.lora_up.weight": torch.randn(o, 4),
            f"{kohya}.alpha": torch.tensor(4.0)}
    cases = {"nan": ({f"{kohya}.alpha": torch.tensor(float("nan"))}, "alpha holds NaN or infinite"),
             "vector": ({f"{kohya}.alpha": torch.ones(3)}, r"alpha has shape \[3\]; expected one"),
             "half": ({f"{kohya}.lora_up.weight": None}, "no complete LoRA, LoHa or LoKr set")}
    for label, (change, pattern) in cases.items():
        sd = {k: v for k, v in {**good, **change}.items() if v is not None}
        save_file(sd, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(SdfastError, match=pattern):
            pipe.load_lora(tmp_path / f"{label}.safetensors")
    assert pipe.loras == {}


def test_lora_tag_with_a_dyn_value_is_an_error():
    from sdfast.addons.tags import parse_tag

    for body in ("x:1:2:3", "x:dyn=8"):
        with pytest.raises(SdfastError, match="not A1111's third value, dyn"):
            parse_tag(body)


def test_lora_strength_that_is_not_a_number_and_merge_flag_name(capsys, tmp_path, no_load):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    rc, _, err = run(capsys, *GEN, "--lora", f"{lora}:abc", "-o", tmp_path / "o.png")
    assert_error(rc, err, r"l\.safetensors:abc: the strengths after .*l\.safetensors must be numbers, "
                          r"got 'abc'")
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"x")
    rc, _, err = run(capsys, "lora", "merge", base, f"{lora}:nan", "-o", tmp_path / "m.safetensors")
    assert_error(rc, err, r"^sdfast: error: LORA .*:nan: strengths must be finite")


@pytest.mark.parametrize("args, pattern", [
    (["-o", ""], r"-o '': no file name"),
    (["-o", ".png"], r"-o '\.png': no file name"),
    (["--steps", "10001"], r"steps must be an integer in 1\.\.10000"),
    (["--batch", "65"], r"batch_size must be an integer in 1\.\.64"),
    (["--cfg", "-inf"], r"--cfg: expected a finite number, got '-inf'"),
])
def test_generate_rejects_empty_names_and_oversized_runs(capsys, tmp_path, no_load, monkeypatch,
                                                         args, pattern):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *GEN, *args)
    assert_error(rc, err, pattern)
    assert _files(tmp_path) == []


def test_negative_numbers_in_exponent_form_are_values():
    from sdfast.cli import build_parser

    args = build_parser().parse_args([*GEN, "--cfg", "-1.5e2"])
    assert args.cfg == -150.0


def test_a_text_file_named_ckpt_is_not_called_code(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("zip junk")
    with pytest.raises(SdfastError, match=r"junk\.ckpt: not a checkpoint \(neither safetensors"):
        sdfast.load(junk)


def test_eval_and_bench_reject_empty_outputs_lone_cache_depth_and_huge_seeds(capsys, tmp_path, no_load):
    rc, _, err = run(capsys, "eval", "shapes", "--json", "")
    assert_error(rc, err, "--json: empty path")
    rc, _, err = run(capsys, "eval", "shapes", "--cache-depth", "2")
    assert_error(rc, err, "--cache-depth needs --cache-interval")
    rc, _, err = run(capsys, "eval", "shapes", "--seed", str(2 ** 70))
    assert_error(rc, err, r"seed must be an integer in 0\.\.")
    rc, _, err = run(capsys, "bench", "--work-dir", tmp_path, "--compare", "none", "--suite", "unet",
                     "--seed", str(10 ** 23))
    assert_error(rc, err, r"--seed \d+: the random weights' seed must be in")
    rc, _, err = run(capsys, "bench", "--work-dir", tmp_path, "--compare", "none", "--suite", "unet",
                     "--seed", "-5")
    assert_error(rc, err, r"--seed -5: the random weights' seed must be in")
