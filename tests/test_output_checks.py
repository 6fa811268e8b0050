"""Output files and folders are checked before any model is loaded or any long work runs, and
are written so that nothing of the user's is destroyed: bad paths are one line, exit 2;
interrupted writes leave the previous files whole; existing files are never replaced without
--overwrite, even one that appeared during the run."""
import json
import os
import shutil
from pathlib import Path

import pytest

from _fixtures import lock
import sdfast
import sdfast.io.load
from sdfast.cli import main
from sdfast.errors import SdfastError
from sdfast.export import manifest as mf
from sdfast.export import onnx_export
from sdfast.export.profiles import BuildShapes

SHAPES = BuildShapes((32, 32), (64, 64), (96, 96), (1, 1, 2), 2)


def _one_line(capsys, rc, pattern):
    """The command failed with exit 2 and exactly one stderr line containing `pattern`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sdfast: error: ") and pattern in lines[0], err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(sdfast, "load", refuse)
    monkeypatch.setattr(sdfast.io.load, "load_components", refuse)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _onnx_folder(root):
    """A folder that looks like an ONNX export (its manifest is all the checks read)."""
    folder = root / "exp"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "sdfast-onnx", "version": 1}))
    (folder / "unet.onnx").write_bytes(b"old unet")
    return folder


# ------------------------------------------------------------- 1: tensorrt -o == --onnx
def test_tensorrt_into_its_own_onnx_folder_is_refused_even_with_overwrite(tmp_path, capsys):
    folder = _onnx_folder(tmp_path)
    before = _snapshot(folder)
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    for output in (folder, tmp_path / "link", f"{folder}/."):
        rc = main(["export", "tensorrt", "--onnx", str(folder), "-o", str(output), "--overwrite"])
        _one_line(capsys, rc, "is the ONNX export folder")
    assert _snapshot(folder) == before


def test_build_engines_refuses_its_own_onnx_folder_before_tensorrt(tmp_path):
    from sdfast.export.tensorrt import build_engines

    folder = _onnx_folder(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(SdfastError, match="is the ONNX export folder"):
        build_engines(folder, folder, SHAPES, overwrite=True)
    assert _snapshot(folder) == before


# ------------------------------------------------------------- 2a: atomic ONNX export
def _fake_export(monkeypatch, fail_at=None, external=("unet", "text_encoder")):
    """Replace the tracing of each graph by writing a small file (and its external data for
    the stages in `external`); the `fail_at`-th graph (1-based) dies midway."""
    calls = []

    def fake(graph, dtype, path, opset, threshold):
        calls.append(path)
        stage = os.path.basename(path)[:-len(".onnx")]
        with open(path, "wb") as fh:
            fh.write(b"new " + stage.encode())
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        data = None
        if stage in external:
            data = os.path.basename(path) + ".data"
            with open(path + ".data", "wb") as fh:
                fh.write(b"new data")
        return {"inputs": {}, "outputs": {}, "initializers": {}, "external_data": data}

    monkeypatch.setattr(onnx_export, "_export_graph", fake)
    return calls


def _old_export(root):
    folder = root / "exp"
    folder.mkdir()
    for stage in onnx_export.STAGES:
        (folder / f"{stage}.onnx").write_bytes(b"old " + stage.encode())
    (folder / "unet.onnx.data").write_bytes(b"old data")
    (folder / "vae_decoder.onnx.data").write_bytes(b"old vae data")
    (folder / "manifest.json").write_text('{"format": "sdfast-onnx", "old": true}')
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def test_an_export_stopped_midway_leaves_the_old_export_whole(tmp_path, monkeypatch):
    folder = _old_export(tmp_path)
    before = _snapshot(folder)
    calls = _fake_export(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(None, folder, overwrite=True)
    assert len(calls) == 3
    assert _snapshot(folder) == before
    assert sorted(os.listdir(folder)) == sorted(before)           # no staging folder left


def test_an_overwriting_export_replaces_graphs_stale_data_and_manifest(tmp_path, monkeypatch):
    folder = _old_export(tmp_path)
    _fake_export(monkeypatch)
    manifest = onnx_export.export_onnx(None, folder, overwrite=True)
    after = _snapshot(folder)
    for stage in onnx_export.STAGES:
        assert after[f"{stage}.onnx"] == b"new " + stage.encode()
    assert after["unet.onnx.data"] == after["text_encoder.onnx.data"] == b"new data"
    assert "vae_decoder.onnx.data" not in after                   # the old graph's: removed
    assert after["notes.txt"] == b"the user's own file"
    assert json.loads(after["manifest.json"]) == manifest
    assert manifest["graphs"]["vae_decoder"]["external_data"] is None
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    mf.write(tmp_path, {"format": "sdfast-onnx", "version": 1})
    before = (tmp_path / "manifest.json").read_bytes()

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", dies)         # stopped after the new text was written
    with pytest.raises(KeyboardInterrupt):
        mf.write(tmp_path, {"format": "sdfast-onnx", "version": 2})
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert os.listdir(tmp_path) == ["manifest.json"]


# ------------------------------------------------------------- 2b: bench JSON / chart
def test_bench_json_never_replaces_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    from sdfast.bench.report import plot, write_json

    path = tmp_path / "r.json"
    write_json({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(SdfastError, match="exists"):
        write_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    write_json({"a": 3}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"a": 3}
    chart = tmp_path / "c.png"
    chart.write_bytes(b"someone's chart")
    with pytest.raises(SdfastError, match="exists"):
        plot([], [], "t", chart)
    assert chart.read_bytes() == b"someone's chart"
    # A file system without hard links: an exclusive create, still never a replacement.
    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(SdfastError, match="exists"):
        write_json({"a": 4}, path)
    assert json.loads(path.read_text()) == {"a": 3}
    write_json({"b": 1}, tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text()) == {"b": 1}
    assert sorted(os.listdir(tmp_path)) == ["c.png", "new.json", "r.json"]  # no temporary files


# ------------------------------------------------------------- 3: export output folders
def test_export_onnx_output_folder_is_checked_before_the_model_loads(tmp_path, capsys,
                                                                     no_model_load):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for output, pattern in ((a_file, "exists and is not a folder"),
                            (a_file / "sub", "is not a folder")):
        rc = main(["export", "onnx", "-o", str(output), "--overwrite"])
        _one_line(capsys, rc, pattern)
    assert a_file.read_text() == "keep me"


def test_export_onnx_unwritable_output_folder(tmp_path, capsys, no_model_load, monkeypatch):
    lock(monkeypatch, tmp_path)
    rc = main(["export", "onnx", "-o", str(tmp_path / "new" / "exp")])
    _one_line(capsys, rc, "is not writable")
    assert not (tmp_path / "new").exists()


def test_export_tensorrt_output_folder_is_checked_first(tmp_path, capsys):
    folder = _onnx_folder(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for output, pattern in ((a_file, "exists and is not a folder"),
                            (a_file / "sub", "is not a folder")):
        rc = main(["export", "tensorrt", "--onnx", str(folder), "-o", str(output), "--overwrite"])
        _one_line(capsys, rc, pattern)
    assert a_file.read_text() == "keep me"


# ------------------------------------------------------------- 4: eval shapes --json
def test_eval_json_folder_or_unwritable_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                         no_model_load,
                                                                         monkeypatch):
    rc = main(["eval", "shapes", "--json", str(tmp_path), "--overwrite", "--n", "1"])
    _one_line(capsys, rc, "is a directory")
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    rc = main(["eval", "shapes", "--save-images", str(a_file / "imgs"), "--n", "1"])
    _one_line(capsys, rc, "is not a directory")
    lock(monkeypatch, tmp_path)
    rc = main(["eval", "shapes", "--json", str(tmp_path / "r.json"), "--n", "1"])
    _one_line(capsys, rc, "is not writable")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_eval_write_json_refuses_a_directory(tmp_path):
    from sdfast.eval.shapes_eval import write_json

    with pytest.raises(SdfastError, match="is a directory"):
        write_json({}, tmp_path, overwrite=True)


# ------------------------------------------------------------- 5: bench --json, --work-dir
@pytest.fixture
def no_bench_run(monkeypatch):
    import sdfast.bench.cli

    def stop(args, log):
        raise SdfastError("stopped before the benchmark (test)")

    monkeypatch.setattr(sdfast.bench.cli, "run", stop)


def test_bench_json_folder_is_created_or_refused_up_front(tmp_path, capsys, no_bench_run):
    work = tmp_path / "work"
    base = ["bench", "--work-dir", str(work), "--suite", "unet", "--compare", "none"]
    rc = main([*base, "--json", str(tmp_path / "missing" / "r.json")])
    _one_line(capsys, rc, "stopped before the benchmark")          # every check passed
    assert (tmp_path / "missing").is_dir()                         # like generate's -o
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    rc = main([*base, "--json", str(a_file / "r.json")])
    _one_line(capsys, rc, "is not a folder")
    rc = main([*base, "--json", str(tmp_path), "--overwrite"])
    _one_line(capsys, rc, "is a folder")
    rc = main(["bench", "--work-dir", str(a_file), "--suite", "unet"])
    _one_line(capsys, rc, "--work-dir")
    rc = main(["bench", "--work-dir", str(a_file / "sub"), "--suite", "unet"])
    _one_line(capsys, rc, "is not a folder")
    assert a_file.read_text() == "keep me"


def test_bench_unwritable_json_folder_or_work_dir(tmp_path, capsys, no_bench_run, monkeypatch):
    (tmp_path / "locked").mkdir()
    lock(monkeypatch, tmp_path / "locked")
    rc = main(["bench", "--work-dir", str(tmp_path / "work"), "--suite", "unet",
               "--json", str(tmp_path / "locked" / "r.json")])
    _one_line(capsys, rc, "--json")
    rc = main(["bench", "--work-dir", str(tmp_path / "locked" / "work"), "--suite", "unet"])
    _one_line(capsys, rc, "--work-dir")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["locked"]


# ------------------------------------------------------------- 9: bench records the commit
def test_bench_versions_record_the_checkout_commit(tmp_path, monkeypatch):
    import subprocess

    from sdfast.bench import measure

    root = Path(sdfast.__file__).resolve().parents[1]
    commit = measure.git_commit()
    if (root / ".git").exists() and shutil.which("git"):
        assert commit is not None, "a git checkout's commit was not recorded"
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert commit.split("+")[0] == head and commit in (head, head + "+dirty")
        assert measure.versions()["commit"] == commit
    # Not a checkout (an installed copy), or no git at all: left out, never an error.
    assert measure.git_commit(str(tmp_path)) is None

    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert measure.git_commit() is None and "commit" not in measure.versions()

    def slow_git(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", measure.GIT_TIMEOUT_S)

    monkeypatch.setattr(subprocess, "run", slow_git)
    assert measure.git_commit() is None


def test_git_commit_marks_a_dirty_tree(tmp_path):
    import subprocess

    from sdfast.bench.measure import git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                       env=env)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "commit.gpgsign=false", "commit", "-q", "-m", "x")
    clean = git_commit(str(tmp_path))
    assert clean and "+" not in clean
    (tmp_path / "untracked.txt").write_text("not tracked: still clean")
    assert git_commit(str(tmp_path)) == clean
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(str(tmp_path)) == clean + "+dirty"


# ------------------------------------------------------------- 6, 7, 8: training
@pytest.fixture
def train_inputs(tmp_path):
    """A model path that exists (the checks before loading only ask that) and a dataset
    config (never read by the checks that come before it)."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read: the checks come first")
    config = tmp_path / "data.toml"
    config.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "none"\n')
    return model, config


def _train(method, model, config, output_dir, *extra):
    from sdfast.train.cli import main as train_main

    return train_main([method, "--model", str(model), "--dataset-config", str(config),
                       "--output-dir", str(output_dir), "--output-name", "x", "--quiet",
                       *extra])


def test_train_output_dir_and_latent_cache_are_checked_first(tmp_path, capsys, train_inputs,
                                                             no_model_load):
    model, config = train_inputs
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for output_dir, extra, pattern in (
            (a_file, (), "output_dir"),
            (a_file / "sub", (), "is not a folder"),
            (tmp_path / "out", ("--cache-latents-to-disk", str(a_file)), "cache_latents_to_disk"),
            (tmp_path / "out", ("--cache-latents-to-disk", str(a_file / "c")), "is not a folder")):
        line = _one_line(capsys, _train("finetune", model, config, output_dir, *extra), pattern)
        assert "not a folder" in line
    out = tmp_path / "out2"
    out.mkdir()
    (out / "latent-cache").write_text("a file where the cache folder goes")
    _one_line(capsys, _train("finetune", model, config, out, "--cache-latents-to-disk"),
              "latent-cache")
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_train_unwritable_output_dir(tmp_path, capsys, train_inputs, no_model_load, monkeypatch):
    model, config = train_inputs
    lock(monkeypatch, tmp_path)
    _one_line(capsys, _train("lora", model, config, tmp_path / "out"), "is not writable")
    assert not (tmp_path / "out").exists()


def test_train_run_refuses_a_file_as_output_dir(tmp_path):
    from sdfast.train.run import TrainRun

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(SdfastError, match="exists and is not a folder"):
        TrainRun(Acc(), a_file, "x", {}, 10)
    assert a_file.read_text() == "keep me"


def test_a_dataset_config_that_is_not_text_is_one_line(tmp_path, capsys, train_inputs,
                                                       no_model_load):
    from sdfast.train.config import load_dataset_config

    model, _ = train_inputs
    image = tmp_path / "image.toml"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00 binary")
    with pytest.raises(SdfastError, match="not UTF-8"):
        load_dataset_config(image)
    line = _one_line(capsys, _train("finetune", model, image, tmp_path / "out"), "not UTF-8")
    assert str(image) in line
    assert not (tmp_path / "out").exists()


def test_a_caption_that_is_not_text_is_one_line(tmp_path):
    from PIL import Image

    from sdfast.train.config import load_dataset_config
    from sdfast.train.dataset import TrainData

    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.png")
    (images / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                      f'image_dir = "{images}"\n')
    with pytest.raises(SdfastError, match="caption file is not UTF-8"):
        TrainData(load_dataset_config(config))


@pytest.mark.parametrize("extra,pattern", [
    (("--network-train-unet-only", "--text-encoder-lr", "1e-5"), "text_encoder_lr needs"),
    (("--network-train-text-encoder-only", "--unet-lr", "1e-5"), "unet_lr needs"),
])
def test_lora_lr_of_a_part_not_trained_is_refused(tmp_path, capsys, train_inputs,
                                                  no_model_load, extra, pattern):
    model, config = train_inputs
    _one_line(capsys, _train("lora", model, config, tmp_path / "out", *extra), pattern)
    assert not (tmp_path / "out").exists()
