"""Past one process: `torchrun --nproc_per_node 2` (gloo on the CPU) trains exactly as one
process with the same global batch, and `sdfast generate --prompts-file` shards a prompt list so
that every image is rendered once, by index, the same whoever renders it."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import sdfast
from _train_fixtures import tiny_models
from sdfast.data.shapes import write_dataset
from sdfast.errors import SdfastError
from sdfast.io.save import save_checkpoint
from sdfast.prompts_file import indexed_paths, my_prompts, read_prompts
from sdfast.train.losslog import read_loss_csv

ROOT = str(Path(sdfast.__file__).resolve().parent.parent)


def _env():
    # One intra-op thread everywhere: results must not depend on how work is split, and two
    # processes on two shared cores must not oversubscribe them.
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, processes=1, cwd=None):
    """`python -m ARGS...`, under torchrun with `processes` > 1; returns stdout."""
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", *args]
    else:
        cmd = [sys.executable, "-m", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_checkpoint(root / "tiny.safetensors", *tiny_models(), "sd1")
    write_dataset(root / "data", 8, seed=0)
    write_dataset(root / "reg", 4, seed=1)
    # shuffled captions and class images: both must follow the global batch, not the process
    (root / "data.toml").write_text(
        '[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\nresolution = 64\n'
        f'batch_size = 2\n[[datasets.subsets]]\nimage_dir = "{root / "data" / "images"}"\n'
        f'[[datasets.subsets]]\nimage_dir = "{root / "reg" / "images"}"\nis_reg = true\n')
    return root


def test_two_processes_train_like_one_with_the_same_global_batch(base):
    common = ["sdfast.train", "lora", "--model", str(base / "tiny.safetensors"),
              "--dataset-config", str(base / "data.toml"), "--output-name", "l",
              "--max-train-steps", "3", "--learning-rate", "1e-2", "--network-dim", "2",
              "--conv-dim", "2", "--prior-loss-weight", "0.5", "--seed", "5", "--quiet"]
    one = launch([*common, "--output-dir", str(base / "one"), "--gradient-accumulation-steps",
                  "2"])
    two = launch([*common, "--output-dir", str(base / "two")], processes=2)
    assert one.split() == [str(base / "one" / "l.safetensors")]
    assert two.split() == [str(base / "two" / "l.safetensors")]        # rank 0 reports, once
    a, b = load_file(str(base / "one" / "l.safetensors")), load_file(str(base / "two" /
                                                                         "l.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if k.endswith("lora_up.weight"))
    print(f"2 processes vs 1: max |weight diff| {worst:.3g} (LoRA up weights reach {moved:.3g})")
    assert moved > 1e-3 and worst <= 1e-6
    losses = [[r[1] for r in read_loss_csv(base / d / "loss.csv")] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert sorted(p.name for p in (base / "two").iterdir()) == \
        ["l.safetensors", "loss.csv", "loss.png", "state-00000003"]


# ---------------------------------------------------------------------------- prompts files
def test_prompt_shares_follow_rank_and_world(tmp_path):
    prompts = [f"prompt {i}" for i in range(7)]
    out = str(tmp_path / "img.png")
    shares = [my_prompts(prompts, out, 1, False, {"RANK": str(r), "WORLD_SIZE": "3"})
              for r in range(3)]
    assert [[i for i, _, _ in share] for share in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shares[1][0] == (1, "prompt 1", [str(tmp_path / "img-00001.png")])
    assert indexed_paths(out, 12, 2) == [str(tmp_path / "img-00012-0.png"),
                                         str(tmp_path / "img-00012-1.png")]
    (tmp_path / "img-00004.png").write_bytes(b"mine")
    with pytest.raises(SdfastError, match="img-00004.png: exists"):
        my_prompts(prompts, out, 1, False, {"RANK": "1", "WORLD_SIZE": "3"})
    assert my_prompts(prompts, out, 1, False, {"RANK": "0", "WORLD_SIZE": "3"})  # not its file
    with pytest.raises(SdfastError, match="not within"):
        my_prompts(prompts, out, 1, False, {"RANK": "3", "WORLD_SIZE": "3"})
    (tmp_path / "p.txt").write_text("a\n\n  b  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(SdfastError, match="holds no prompt"):
        read_prompts(tmp_path / "blank.txt")


GEN = ["-W", "64", "-H", "64", "--steps", "2", "--quiet"]


def test_prompts_file_renders_each_prompt_as_prompt_and_seed_would(base, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\na green triangle\n")
    model = ["--model", str(base / "tiny.safetensors")]
    (tmp_path / "all").mkdir()
    out = launch(["sdfast", "generate", *model, "--prompts-file", str(tmp_path / "prompts.txt"),
                  "--seed", "10", *GEN, "-o", str(tmp_path / "all" / "img.png")])
    names = [f"img-{i:05d}.png" for i in range(3)]
    assert out.split() == [str(tmp_path / "all" / n) for n in names]
    launch(["sdfast", "generate", *model, "--prompt", "a blue square", "--seed", "11", *GEN,
            "-o", str(tmp_path / "one.png")])
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "all" / names[1]).read_bytes()


def test_prompts_file_sharded_by_torchrun_renders_each_prompt_once(base, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(f"a shape number {i}" for i in range(5)))
    args = ["sdfast", "generate", "--model", str(base / "tiny.safetensors"), "--prompts-file",
            str(tmp_path / "prompts.txt"), *GEN]
    for folder, processes in (("alone", 1), ("shared", 2)):
        (tmp_path / folder).mkdir()
        launch([*args, "-o", str(tmp_path / folder / "img.png")], processes=processes)
    names = [f"img-{i:05d}.png" for i in range(5)]
    for folder in ("alone", "shared"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    for name in names:
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "shared" / name).read_bytes()


def test_prompt_and_prompts_file_exclude_each_other(tmp_path):
    from test_cli import assert_one_line_error, run_cli

    rc, _, err = run_cli("generate", "--prompt", "x", "--prompts-file", str(tmp_path / "p.txt"))
    assert_one_line_error(rc, err, "one of --prompt and --prompts-file")
    rc, _, err = run_cli("generate", "--prompts-file", str(tmp_path / "missing.txt"),
                         "--model", str(tmp_path))
    assert_one_line_error(rc, err, "no such prompts file")
