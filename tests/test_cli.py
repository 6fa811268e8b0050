"""The command line's contract for bad input: one line on stderr, exit 2, nothing written."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from test_io import Evil, fake_sd


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "sdfast", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, err, pattern):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


GEN = ["generate", "--prompt", "x"]


def test_missing_model_file(tmp_path):
    rc, _, err = run_cli(*GEN, "--model", str(tmp_path / "missing.safetensors"),
                         "-o", str(tmp_path / "o.png"))
    assert_one_line_error(rc, err, "no such file")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args, pattern", [
    (["-W", "500"], "multiple of 8"),
    (["-H", "0"], "multiple of 8"),
    (["--steps", "0"], "must be >= 1"),
    (["--sampler", "nope"], "euler_ancestral"),          # the message lists valid names
    (["--scheduler", "nope"], "karras"),
    (["--strength", "1.5", "--init-image", "x.png"], "strength"),
])
def test_bad_arguments_fail_before_loading(tmp_path, args, pattern):
    # The model path does not exist: argument errors must be reported first, without loading.
    rc, _, err = run_cli(*GEN, "--model", str(tmp_path / "m.safetensors"), *args)
    assert_one_line_error(rc, err, pattern)


def test_unknown_command_and_missing_args():
    rc, _, err = run_cli("frobnicate")
    assert_one_line_error(rc, err, "invalid choice")
    rc, _, err = run_cli("generate")
    assert_one_line_error(rc, err, "required")


def test_crafted_pickle_is_refused_by_cli_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Evil(str(marker))}, path)
    for args in (["info", str(path)], [*GEN, "--model", str(path), "-o", str(tmp_path / "o.png")]):
        rc, _, err = run_cli(*args)
        assert_one_line_error(rc, err, "refused: this file runs code when loaded; "
                                       "convert it to safetensors")
    assert not marker.exists()


def test_unrecognised_and_sdxl_checkpoints_say_what_was_found(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(path))
    rc, _, err = run_cli("info", str(path))
    assert_one_line_error(rc, err, "unrecognised checkpoint")
    assert "1 tensors, top-level prefixes: lora_unet_down" in err
    xl = tmp_path / "xl.safetensors"
    save_file(fake_sd(sdxl=True), str(xl))
    rc, _, err = run_cli("info", str(xl))
    assert_one_line_error(rc, err, "SDXL")


def test_folder_without_model_index(tmp_path):
    rc, _, err = run_cli("info", str(tmp_path))
    assert_one_line_error(rc, err, "model_index.json")


def test_info_on_synthetic_sd2_inpaint(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file(fake_sd("sd2", in_channels=9), str(path))
    rc, out, err = run_cli("info", str(path))
    assert rc == 0, err
    assert "family: sd2" in out and "inpaint: True" in out and "prediction: eps" in out
    assert "parameters.unet: 648" in out            # 8 * 9 * 3 * 3 weights in the fake UNet


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sdfast.builtin import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("cli") / "tiny.safetensors")


def test_generate_writes_pngs_with_a1111_parameters_and_never_overwrites(tiny_model, tmp_path):
    from PIL import Image

    from sdfast.io.png import file_hash

    out = tmp_path / "out.png"
    args = [*GEN, "--model", str(tiny_model), "-W", "64", "-H", "64", "--steps", "2",
            "--seed", "7", "--negative", "blurry", "--sampler", "euler_ancestral",
            "--scheduler", "karras", "--quiet", "-o", str(out)]
    rc, stdout, err = run_cli(*args)
    assert rc == 0, err
    assert stdout.split() == [str(out)]
    with Image.open(out) as img:
        assert img.size == (64, 64)
        params = img.text["parameters"]
    assert params == ("x\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Schedule type: "
                      f"Karras, CFG scale: 7, Seed: 7, Size: 64x64, Model hash: "
                      f"{file_hash(str(tiny_model))}, Model: tiny")
    first = out.read_bytes()
    rc, stdout, err = run_cli(*args, "--batch", "2")
    assert rc == 0, err
    assert stdout.split() == [str(tmp_path / "out-1.png"), str(tmp_path / "out-2.png")]
    assert out.read_bytes() == first                     # the existing file is untouched
    rc, stdout, err = run_cli(*args[:-2], "--seed", "8", "-o", str(out), "--overwrite")
    assert rc == 0, err
    assert out.read_bytes() != first


def test_generate_creates_the_output_folder_and_refuses_a_path_through_a_file(tmp_path):
    out = tmp_path / "new" / "deeper" / "o.png"
    rc, stdout, err = run_cli(*GEN, "--steps", "1", "--quiet", "-o", str(out))
    assert rc == 0, err
    assert stdout.split() == [str(out)] and out.is_file()
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    rc, _, err = run_cli(*GEN, "--steps", "1", "--quiet", "-o", str(blocker / "o.png"))
    assert_one_line_error(rc, err, "file.txt is not a folder")
    assert blocker.read_text() == "keep me"


def test_generate_defaults_to_the_models_native_size(tmp_path):
    # No -W/-H: the built-in model is sampled at the 64x64 it was trained at, not at 512.
    from PIL import Image

    out = tmp_path / "native.png"
    rc, stdout, err = run_cli(*GEN, "--steps", "1", "--quiet", "-o", str(out))
    assert rc == 0, err
    with Image.open(out) as img:
        assert img.size == (64, 64)
        assert "Size: 64x64" in img.text["parameters"]


@pytest.mark.parametrize("metadata,family,prediction,expected", [
    ({"sdfast.resolution": "96"}, "sd1", "eps", (96, 96)),
    ({"modelspec.resolution": "640x512"}, "sd1", "eps", (640, 512)),
    ({"modelspec.resolution": "huge"}, "sd1", "eps", (512, 512)),
    ({}, "sd2", "v", (768, 768)),
    ({}, "sd2", "eps", (512, 512)),
    ({"sdfast.model": "sdfast-shapes"}, "sd1", "eps", (64, 64)),
])
def test_native_size_rules(metadata, family, prediction, expected):
    from types import SimpleNamespace

    from sdfast.pipeline import native_size

    info = SimpleNamespace(family=family, prediction=prediction)
    assert native_size(metadata, info) == expected


@pytest.mark.parametrize("user_value,huge", [(None, True), ("0", False)])
def test_cli_asks_torch_for_huge_pages_unless_the_user_said_otherwise(user_value, huge):
    # torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation; with it, buffers of 2 MB and
    # more are page-aligned (64-byte-aligned without), which is what this checks in a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    # main() sets it before torch is imported (the CLI module must not import torch itself)
    code = ("import sys, sdfast.cli as c\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "import torch\n"
            "print(all(torch.empty(n).data_ptr() % 4096 == 0 for n in (10 ** 6, 2 * 10 ** 6, 3 * 10 ** 6)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(huge)
