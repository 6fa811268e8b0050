"""`sdfast bench`: the suite's own behaviour on the built-in model's shapes (tiny, fast).

Speed is never asserted: these check that a run produces the table, the JSON with its
documented keys and the chart, that every baseline computed the same thing as sdfast (the
suite's own checks), that unavailable baselines say why, and that bad flags are one line, exit 2.
"""
import json
import statistics

import pytest
import torch
from PIL import Image

from sdfast.bench.measure import Stats, interleave
from sdfast.bench.suites import Row
from sdfast.cli import main

ROW_KEYS = {"suite", "name", "unit", "kind", "runs", "ratios", "ratio_meaning", "unavailable",
            "checks", "notes", "goal", "status", "work", "rates"}
STATS_KEYS = {"median", "q1", "q3", "min", "max", "n", "samples"}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-work")


def _bench(capsys, work_dir, *args):
    rc = main(["bench", "--arch", "builtin", "--work-dir", str(work_dir), "--threads", "1",
               "--quiet", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_unet_suite_writes_table_json_and_chart(capsys, work_dir, tmp_path, keep_threads):
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    rc, out, err = _bench(capsys, work_dir, "--suite", "unet", "--resolution", "64",
                          "--repeats", "2", "--warmup", "0", "--json", str(out_json),
                          "--plot", str(out_png))
    assert rc == 0, err
    assert "| suite | measurement | sdfast | diffusers | torch-reference | onnxruntime | goal |" in out
    assert "| unet | UNet step 64x64, batch 1 (CFG: 2 rows) |" in out
    record = json.loads(out_json.read_text())
    assert {"schema", "command", "argv", "date", "machine", "versions", "settings", "model",
            "rows", "load_average_at_end"} <= record.keys()
    assert record["command"].startswith("sdfast bench --arch builtin --device cpu --dtype fp32")
    assert {"cpu", "cores", "torch_threads", "platform", "python"} <= record["machine"].keys()
    assert record["machine"]["torch_threads"] == 1
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or \
        record["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    (unet,) = record["rows"]
    assert unet.keys() == ROW_KEYS
    assert set(unet["runs"]) == {"sdfast", "diffusers", "torch-reference", "onnxruntime"}
    for stats in unet["runs"].values():
        assert stats.keys() == STATS_KEYS and stats["n"] == 2
        assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    assert set(unet["ratios"]) == {"diffusers", "torch-reference", "onnxruntime"}
    sd = unet["runs"]["sdfast"]["median"]
    assert unet["ratios"]["diffusers"] == pytest.approx(unet["runs"]["diffusers"]["median"] / sd)
    assert unet["goal"]["vs"] == "diffusers" and unet["goal"]["at_least"] == 1.5
    assert isinstance(unet["goal"]["met"], bool)
    assert unet["unavailable"] == {}
    # Every baseline ran the same UNet on the same weights: fp32 rounding apart, equal outputs.
    for name in ("diffusers", "torch-reference", "onnxruntime"):
        check = unet["checks"][name]
        assert check["max_abs_diff_vs_sdfast"] < 1e-4 * max(1.0, check["max_abs_sdfast"])
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.width == 960 and image.height > 100
    # never overwrite a result without --overwrite
    rc, _, err = _bench(capsys, work_dir, "--suite", "kernels", "--json", str(out_json))
    assert rc == 2 and "exists" in err


def test_kernels_suite_times_sdfast_ops_against_torch(capsys, work_dir, tmp_path, keep_threads,
                                                      monkeypatch):
    from sdfast.bench import kernels

    projections = kernels.sd15_attention_projections()[:8]          # a small LoRA: a fast test
    monkeypatch.setattr(kernels, "sd15_attention_projections", lambda: projections)
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    rc, out, err = _bench(capsys, work_dir, "--suite", "kernels", "--resolution", "64",
                          "--repeats", "1", "--warmup", "0", "--compare", "diffusers",
                          "--json", str(out_json), "--plot", str(out_png))
    assert rc == 0, err
    with Image.open(out_png) as image:                    # a panel per row, microseconds or not
        assert image.format == "PNG" and image.height > 20 * 40
    # torch is the kernels' baseline even when --compare does not name torch-reference
    assert "| suite | measurement | sdfast | diffusers | torch-reference | goal |" in out
    assert "| kernels | attention (cross) B=2 H=8 N=64 M=77 D=40 |" in out
    roof, *rows = json.loads(out_json.read_text())["rows"]
    assert set(roof["runs"]) == {"torch-reference"} and roof["rates"]["torch-reference"]["unit"] == "GFLOP/s"
    roofline = roof["rates"]["torch-reference"]["value"]
    assert roofline == pytest.approx(2 * 2048 ** 3 / roof["runs"]["torch-reference"]["median"] / 1e9)
    ops = [row["name"] for row in rows]
    for name in ("group_norm+silu nchw [2, 320, 8, 8]", "group_norm+silu nhwc [2, 1280, 1, 1]",
                 "attention (self) B=2 H=8 N=4 M=4 D=160",
                 "lora_merge (rank 32, 8 SD1.5 attention projections)",
                 "conv2d 3x3 nhwc [2, 640, 4, 4]"):
        assert name in ops
    goals = {"group_norm+silu": 2.5, "attention (cross)": 1.3, "lora_merge": 2.0}
    for row in rows:
        assert row.keys() == ROW_KEYS and set(row["runs"]) == {"sdfast", "torch-reference"}
        assert row["unavailable"]["diffusers"].startswith("not applicable")
        runs = {name: stats["median"] for name, stats in row["runs"].items()}
        assert row["ratios"] == {"torch-reference": pytest.approx(runs["torch-reference"] / runs["sdfast"])}
        goal = next((v for k, v in goals.items() if row["name"].startswith(k)), None)
        assert (row["goal"] or {}).get("at_least") == goal
        assert goal is None or row["goal"]["vs"] == "torch-reference" and isinstance(row["goal"]["met"], bool)
        assert set(row["rates"]) == {"sdfast", "torch-reference"}     # the loop below checks both
        for name, rate in row["rates"].items():
            work = row["work"]
            assert rate["value"] == pytest.approx(work["amount"] / runs[name] / work["scale"])
            if row["name"].startswith(("attention", "conv2d")):   # FLOPs: read against the GEMM
                gflops = rate["value"] * work["scale"] / 1e9
                assert rate["share_of_roofline"] == pytest.approx(gflops / roofline)
            else:
                assert rate["unit"] == "GB/s" and "share_of_roofline" not in rate
        # the same op on the same inputs: fp32 rounding apart (Winograd's transforms, other
        # summation orders), the same output
        check = row["checks"]["torch-reference"]
        assert check["max_abs_diff_vs_sdfast"] < 1e-4 * max(1.0, check["max_abs_sdfast"])


def test_an_unavailable_baseline_says_why(capsys, work_dir, tmp_path, keep_threads, monkeypatch):
    from sdfast.bench.runtimes import RUNTIMES

    monkeypatch.setattr(RUNTIMES["onnxruntime"], "unavailable", lambda self, device: "no reason")
    out_json = tmp_path / "run.json"
    rc, out, err = _bench(capsys, work_dir, "--suite", "unet", "--resolution", "64", "--repeats",
                          "1", "--warmup", "0", "--compare", "onnxruntime", "--json", str(out_json))
    assert rc == 0, err
    assert "| unet | UNet step 64x64, batch 1 (CFG: 2 rows) |" in out and "| n/a |" in out
    assert "- unet / onnxruntime: no reason" in out
    (row,) = json.loads(out_json.read_text())["rows"]
    assert set(row["runs"]) == {"sdfast"} and row["ratios"] == {}
    assert row["unavailable"] == {"onnxruntime": "no reason"} and row["goal"]["met"] is None


def test_e2e_and_lora_suites_agree_with_diffusers(capsys, work_dir, tmp_path, keep_threads):
    out_json = tmp_path / "run.json"
    rc, out, err = _bench(capsys, work_dir, "--suite", "e2e,lora", "--resolution", "64",
                          "--steps", "2", "--repeats", "1", "--warmup", "0",
                          "--compare", "diffusers", "--json", str(out_json))
    assert rc == 0, err
    e2e, load, swap = json.loads(out_json.read_text())["rows"]
    assert set(e2e["runs"]) == {"sdfast", "diffusers"}
    # the same seed, noise, sampler and weights: the same image up to one 8-bit level
    assert e2e["checks"]["diffusers"]["max_pixel_diff_vs_sdfast_0_255"] <= 1
    ratio = load["runs"]["diffusers"]["median"] / load["runs"]["sdfast"]["median"]
    assert load["ratios"] == {"diffusers": pytest.approx(ratio)}
    met = load["goal"].pop("met")
    assert load["goal"] == {"vs": "diffusers", "at_least": 5.0}
    assert isinstance(met, bool) and met == (ratio >= 5.0)
    assert swap["goal"] is None and set(swap["runs"]) == {"sdfast", "diffusers"}
    check = load["checks"]["diffusers"]
    for part in ("unet", "text"):
        # the merged LoRA changes each model by its effect; both sides merge the same change
        assert check[f"{part}_lora_effect"] > 1e-2
        assert check[f"{part}_max_abs_diff_vs_sdfast"] < 1e-3 * check[f"{part}_lora_effect"]


def test_accelerated_diffusers_and_step_caching_rows(capsys, work_dir, tmp_path, keep_threads,
                                                     monkeypatch):
    """--compare diffusers-accelerated: diffusers with `sdfast.accelerate(pipe)`, beside plain
    diffusers; --cache-interval: e2e adds sdfast's cached generate, timed in the same rounds."""
    from sdfast.bench import suites

    sampled = []                              # the samples of every interleave() call

    def spy(runners, *args, **kwargs):
        sampled.append(interleave(runners, *args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(suites, "interleave", spy)
    out_json = tmp_path / "run.json"
    rc, out, err = _bench(capsys, work_dir, "--suite", "unet,e2e", "--resolution", "64",
                          "--steps", "2", "--repeats", "1", "--warmup", "0", "--cache-interval", "2",
                          "--cache-depth", "1", "--compare", "diffusers,diffusers-accelerated",
                          "--json", str(out_json))
    assert rc == 0, err
    assert "| suite | measurement | sdfast | diffusers | diffusers-accelerated | goal |" in out
    assert "| e2e | the same with step caching (cache_interval 2, cache_depth 1) |" in out
    record = json.loads(out_json.read_text())
    assert record["settings"]["cache_interval"] == 2 and "--cache-interval 2" in record["command"]
    assert record["settings"]["cache_depth"] == 1 and "--cache-depth 1" in record["command"]
    unet, e2e, cached = record["rows"]
    check = unet["checks"]["diffusers-accelerated"]                # sdfast's ops inside diffusers
    assert check["max_abs_diff_vs_sdfast"] < 1e-4 * max(1.0, check["max_abs_sdfast"])
    assert e2e["checks"]["diffusers-accelerated"]["max_pixel_diff_vs_sdfast_0_255"] <= 1
    assert set(cached["runs"]) == {"sdfast", "sdfast-uncached", "diffusers", "diffusers-accelerated"}
    # Cached and uncached (and every baseline) were sampled in one interleave() call, i.e. in
    # the same rotating rounds, and each column holds that call's samples of its runner.
    (rounds,) = [s for s in sampled if "sdfast-cached" in s]
    assert set(rounds) == {"sdfast", "sdfast-cached", "diffusers", "diffusers-accelerated"}
    columns = {"sdfast": "sdfast-cached", "sdfast-uncached": "sdfast", "diffusers": "diffusers",
               "diffusers-accelerated": "diffusers-accelerated"}     # column -> its runner
    for column, runner in columns.items():
        assert cached["runs"][column]["samples"] == rounds[runner]
    assert e2e["runs"]["sdfast"]["samples"] == rounds["sdfast"]
    # the speed-up, from those samples
    speedup = statistics.median(rounds["sdfast"]) / statistics.median(rounds["sdfast-cached"])
    assert cached["ratios"]["sdfast-uncached"] == pytest.approx(speedup)
    met = cached["goal"].pop("met")
    assert cached["goal"] == {"vs": "sdfast-uncached", "at_least": 2.0}
    assert isinstance(met, bool) and met == (speedup >= 2.0)
    quality = cached["checks"]["sdfast-uncached"]
    assert quality["speedup_vs_uncached"] == pytest.approx(speedup)
    # one of two steps reuses the deep features: the image stays close to the uncached one
    assert quality["psnr_db_vs_uncached"] >= quality["psnr_db_min"] > 20
    assert f"x{speedup:.2f} faster than sdfast's uncached generate" in out


def test_load_and_memory_suites_run_in_fresh_processes(capsys, work_dir, tmp_path, keep_threads):
    out_json = tmp_path / "run.json"
    rc, out, err = _bench(capsys, work_dir, "--suite", "load,memory", "--resolution", "64",
                          "--steps", "1", "--repeats", "1", "--warmup", "0",
                          "--compare", "torch-reference", "--json", str(out_json))
    assert rc == 0, err
    total, call, page_in, memory = json.loads(out_json.read_text())["rows"]
    assert total["runs"]["sdfast"]["median"] >= call["runs"]["sdfast"]["median"] > 0
    assert page_in["runs"]["sdfast"]["median"] > 0
    assert "not applicable" in total["unavailable"]["torch-reference"]
    assert memory["unit"] == "MiB" and memory["kind"] == "memory"
    assert set(memory["runs"]) == {"sdfast", "torch-reference"}
    assert 100 < memory["runs"]["sdfast"]["median"] < 10_000          # a process, in MiB
    assert memory["ratios"]["torch-reference"] == pytest.approx(
        memory["runs"]["sdfast"]["median"] / memory["runs"]["torch-reference"]["median"])


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss survives fork and exec on Linux: a child of a bench process holding models
    would report at least the parent's peak. The child's figure is its own address space's."""
    import subprocess
    import sys

    held = bytearray(512 * 2 ** 20)
    held[::4096] = b"\x01" * len(held[::4096])                      # touch every page
    code = "from sdfast.bench.child import _peak_rss_mib; print(_peak_rss_mib())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 1 < float(proc.stdout) < 256                      # a bare interpreter, not the 512 MiB
    del held


@pytest.mark.parametrize("args,message", [
    (["--suite", "nope"], "--suite: unknown 'nope'"),
    (["--suite", ","], "--suite: name at least one suite"),
    (["--compare", "comfyui"], "--compare: unknown 'comfyui'"),
    (["--resolution", "100"], "must be a positive multiple of 8"),
    (["--repeats", "0"], "must be >= 1"),
    (["--warmup", "-1"], "must be >= 0"),
    (["--arch", "sdxl"], "invalid choice: 'sdxl'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--model", "missing.safetensors"], "missing.safetensors: no such file"),
    (["--plot", "chart.jpg"], "the chart is a PNG file"),
    (["--cache-interval", "1"], "must be >= 2"),
    (["--suite", "unet", "--cache-interval", "2"], "--cache-interval: only the e2e suite uses it"),
    (["--suite", "e2e", "--cache-depth", "1"], "--cache-depth needs --cache-interval"),
])
def test_bad_flags_are_one_line_exit_2(capsys, tmp_path, args, message):
    rc = main(["bench", "--work-dir", str(tmp_path), *args])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not any(tmp_path.iterdir())                        # nothing built or written


def test_arch_and_model_are_exclusive_and_cuda_must_exist(capsys, tmp_path):
    rc = main(["bench", "--arch", "sd15", "--model", str(tmp_path), "--work-dir", str(tmp_path)])
    assert rc == 2 and "not allowed with argument" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(["bench", "--device", "cuda", "--work-dir", str(tmp_path)])
        assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_interleaving_rotates_the_order_and_stats_summarise():
    calls = []
    runners = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    samples = interleave(runners, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert samples == {"a": [4, 9, 11], "b": [5, 7, 12], "c": [6, 8, 10]}
    stats = Stats([4.0, 1.0, 3.0, 2.0, 100.0]).as_dict()
    assert (stats["median"], stats["q1"], stats["q3"], stats["min"], stats["max"]) == (3, 2, 4, 1, 100)
    assert Stats([2.0, 1.0]).quartiles() == (1.0, 2.0)


def test_ratios_and_goals_by_kind():
    time_row = Row("unet", "x", runs={"sdfast": Stats([1.0]), "diffusers": Stats([2.0])},
                   goal={"vs": "diffusers", "at_least": 1.5})
    assert time_row.ratios() == {"diffusers": 2.0} and time_row.goal_met() is True
    mem_row = Row("memory", "x", unit="MiB", kind="memory",
                  runs={"sdfast": Stats([900.0]), "diffusers": Stats([1000.0])},
                  goal={"vs": "diffusers", "at_most": 0.8})
    assert mem_row.ratios() == {"diffusers": 0.9} and mem_row.goal_met() is False
    assert Row("lora", "x", goal={"vs": "diffusers", "at_least": 5}).goal_met() is None


@pytest.mark.parametrize("kind", ["small_sd1", "small_sd2"])
def test_diffusers_config_folder_loads_the_single_file_as_diffusers_built_it(kind, tmp_path):
    """The configs written from what sdfast detects let diffusers' from_single_file rebuild the
    reference pipeline exactly (SD2: 64-wide UNet heads, OpenCLIP without its unused block)."""
    from diffusers import StableDiffusionPipeline

    import sdfast
    from _pipelines import family_of, make_reference, save_single_file
    from sdfast.bench.arch import write_diffusers_config

    ref = make_reference(kind, tmp_path)
    single = save_single_file(ref, family_of(kind), tmp_path / "model.safetensors")
    config = write_diffusers_config(sdfast.load(single, prediction="eps"), tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32)
    head = ref.unet.config.attention_head_dim
    assert pipe.unet.config.attention_head_dim == (head if isinstance(head, int) else list(head))
    assert pipe.text_encoder.config.num_hidden_layers == ref.text_encoder.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=gen)
    ids = pipe.tokenizer(["a red circle", "x"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    ref_ids = ref.tokenizer(["a red circle", "x"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 500, ctx).sample, ref.unet(x, 500, ctx).sample)
        assert torch.equal(pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0])
        # The file keeps the VAE's attention projections as 1x1 convs; diffusers converts them
        # to Linear layers, which round differently from its own freshly built model.
        a, b = pipe.vae.decode(x).sample, ref.vae.decode(x).sample
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("source", ["single", "folder"])
def test_model_flag_times_a_user_file_or_folder(source, capsys, tmp_path, keep_threads):
    """--model: a single file gets a diffusers config folder written from what sdfast detects
    (cached in the work folder); a diffusers folder loads as it is on both sides."""
    from _pipelines import family_of, make_reference, save_single_file

    ref = make_reference("small_sd2", tmp_path)
    if source == "single":
        model = save_single_file(ref, family_of("small_sd2"), tmp_path / "mine.safetensors",
                                 metadata={"sdfast.prediction": "eps"})
    else:
        model = tmp_path / "mine"
        ref.save_pretrained(str(model))
    out_json = tmp_path / "run.json"
    rc = main(["bench", "--model", str(model), "--suite", "unet", "--resolution", "64",
               "--repeats", "1", "--warmup", "0", "--compare", "diffusers", "--threads", "1",
               "--work-dir", str(tmp_path / "work"), "--json", str(out_json), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(out_json.read_text())
    assert record["model"]["label"] == model.name and record["model"]["family"] == "sd2"
    assert record["command"].startswith(f"sdfast bench --model {model}")
    check = record["rows"][0]["checks"]["diffusers"]
    assert check["max_abs_diff_vs_sdfast"] < 1e-4 * max(1.0, check["max_abs_sdfast"])
    configs = list((tmp_path / "work").glob("configs/*/model_index.json"))
    assert len(configs) == (1 if source == "single" else 0)
