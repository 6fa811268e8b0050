"""`sdfast train finetune` end to end on a tiny SD-shaped model and the shapes dataset:
the loss falls, only the intended parts change, resume repeats an uninterrupted run, saves are
atomic and never replace another run's files, and the CLI reports bad input on one line."""
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sdfast
from _train_fixtures import interrupt_at, one_thread, tiny_models  # noqa: F401
from sdfast.data.shapes import write_dataset
from sdfast.errors import SdfastError
from sdfast.io.load import load_components
from sdfast.io.save import save_checkpoint
from sdfast.sampling import ModelSampling
from sdfast.text import get_tokenizer
from sdfast.train import train_finetune
from sdfast.train.cli import main as train_main
from sdfast.train.common import enable_gradient_checkpointing
from sdfast.train.dataset import load_image
from sdfast.train.losslog import read_loss_csv
from sdfast.train.objectives import (VAE_SCALE, DiffusionObjective, VAEObjective,
                                     diffusion_target, noisy_latents)
from sdfast.train.run import RUN_ID_KEY

N_IMAGES = 16
STEPS = 20
FAST = dict(learning_rate=2e-3, cache_latents=True, progress=False, seed=7)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    save_checkpoint(root / "tiny.safetensors", *tiny_models(), "sd1")
    write_dataset(root / "data", N_IMAGES, seed=0)
    (root / "data.toml").write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\n'
                                    'resolution = 64\nbatch_size = 4\n[[datasets.subsets]]\n'
                                    'image_dir = "data/images"\n')
    return root


@pytest.fixture(scope="module")
def run_a(base):
    """The reference run: STEPS steps, saved every 10."""
    return train_finetune(base / "tiny.safetensors", base / "data.toml", base / "a", "tuned",
                          max_train_steps=STEPS, save_every_n_steps=10, **FAST)


def parts_sd(path):
    sd = load_file(str(path))
    groups = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text": "cond_stage_model."}
    return {name: {k: v for k, v in sd.items() if k.startswith(prefix)}
            for name, prefix in groups.items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batch(root, n=8):
    paths = sorted((root / "data" / "images").glob("*.png"))[:n]
    images = torch.stack([load_image(p, (64, 64)) for p in paths])
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    return images, captions


@torch.no_grad()
def fixed_diffusion_loss(path, root):
    """Loss of a model on a fixed batch, fixed noise and evenly spread timesteps."""
    parts = load_components(path, "cpu", torch.float32)
    images, captions = batch(root)
    latents = parts.vae.encode(images).mean * VAE_SCALE
    ids = get_tokenizer()(captions)
    objective = DiffusionObjective(parts.unet, parts.text_encoder, ModelSampling().alphas_cumprod)
    gen = torch.Generator().manual_seed(123)
    losses = [objective(latents, ids, torch.randn(latents.shape, generator=gen),
                        torch.arange(8) * 125 + 10 + 30 * r) for r in range(4)]
    return float(torch.stack(losses).mean())


@torch.no_grad()
def fixed_vae_loss(path, root):
    parts = load_components(path, "cpu", torch.float32)
    images, _ = batch(root)
    return float(VAEObjective(parts.vae)(images, torch.zeros(8, 4, 8, 8)))


# ---------------------------------------------------------------------------- the main run
def test_loss_falls(base, run_a):
    assert len(run_a.losses) == STEPS
    first, last = sum(run_a.losses[:4]) / 4, sum(run_a.losses[-4:]) / 4
    before = fixed_diffusion_loss(base / "tiny.safetensors", base)
    after = fixed_diffusion_loss(run_a.output, base)
    print(f"per-step loss {first:.4f} -> {last:.4f}; fixed batch {before:.4f} -> {after:.4f}")
    assert last < 0.7 * first
    assert after < 0.7 * before


def test_only_the_unet_changed(base, run_a):
    old, new = parts_sd(base / "tiny.safetensors"), parts_sd(run_a.output)
    assert same(old["vae"], new["vae"]) and same(old["text"], new["text"])
    assert not same(old["unet"], new["unet"])
    assert all(v.dtype == torch.float32 for v in new["unet"].values())


def test_output_loads_and_generates(run_a):
    pipe = sdfast.load(run_a.output, device="cpu")
    images = pipe.generate("a red circle", width=64, height=64, steps=2, seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_run_files(base, run_a):
    out = base / "a"
    step10 = out / "tuned-step00000010.safetensors"
    with safe_open(str(step10), "pt") as f10, safe_open(str(run_a.output), "pt") as ffinal:
        m10, mfinal = f10.metadata(), ffinal.metadata()
    assert m10["sdfast.train.step"] == "10" and mfinal["sdfast.train.step"] == str(STEPS)
    assert m10[RUN_ID_KEY] == mfinal[RUN_ID_KEY]
    assert not same(load_file(str(step10)), load_file(str(run_a.output)))
    assert (out / "state-00000010").is_dir() and run_a.state_dir == out / "state-00000020"
    rows = read_loss_csv(out / "loss.csv")
    assert [r[0] for r in rows] == list(range(1, STEPS + 1))
    assert [r[1] for r in rows] == pytest.approx(run_a.losses, rel=1e-6)
    assert all(r[2] == pytest.approx(2e-3) for r in rows)
    with Image.open(out / "loss.png") as png:
        assert png.format == "PNG" and png.size == (720, 420)
    assert not list(out.glob(".*"))                          # no temporary files left


# ---------------------------------------------------------------------------- resume
def test_resume_equals_uninterrupted(base, run_a, monkeypatch):
    args = (base / "tiny.safetensors", base / "data.toml", base / "b", "tuned")
    interrupt_at(monkeypatch, 12)                 # dies in step 13, after the save at step 10
    with pytest.raises(KeyboardInterrupt):
        train_finetune(*args, max_train_steps=STEPS, save_every_n_steps=10, **FAST)
    monkeypatch.undo()
    assert len(read_loss_csv(base / "b" / "loss.csv")) == 12
    resumed = train_finetune(*args, max_train_steps=STEPS, save_every_n_steps=10,
                             resume=base / "b", **FAST)
    assert resumed.losses == pytest.approx(run_a.losses, rel=1e-6, abs=1e-7)
    a, b = load_file(str(run_a.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted: max |loss diff| "
          f"{max(abs(x - y) for x, y in zip(resumed.losses, run_a.losses)):.3g}, "
          f"max |weight diff| {worst:.3g}")
    assert worst <= 1e-6
    assert [r[1] for r in read_loss_csv(base / "b" / "loss.csv")] == \
        pytest.approx(run_a.losses, rel=1e-6)


def test_interrupted_save_leaves_previous_file(base, run_a, monkeypatch):
    shutil.copytree(base / "a", base / "c")
    final = base / "c" / "tuned.safetensors"
    before = final.read_bytes()
    real = safetensors.torch.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:3]), filename, metadata=metadata)   # a partial file
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):        # resume at 10, save the final at 11
        train_finetune(base / "tiny.safetensors", base / "data.toml", base / "c", "tuned",
                       max_train_steps=11, save_every_n_steps=10,
                       resume=base / "c" / "state-00000010", **FAST)
    assert final.read_bytes() == before
    assert not [p for p in (base / "c").iterdir() if ".tmp" in p.name]


def test_refuses_to_overwrite(base, run_a, tmp_path):
    args = (base / "tiny.safetensors", base / "data.toml")
    with pytest.raises(SdfastError, match="not written by this run"):       # another run's model
        train_finetune(*args, base / "a", "tuned", max_train_steps=STEPS, **FAST)
    foreign = tmp_path / "tuned.safetensors"
    foreign.write_bytes(b"precious")
    with pytest.raises(SdfastError, match="refusing to overwrite"):
        train_finetune(*args, tmp_path, "tuned", max_train_steps=2, **FAST)
    with pytest.raises(SdfastError, match="refusing to overwrite"):         # even on --resume
        train_finetune(*args, tmp_path, "tuned", max_train_steps=STEPS, save_every_n_steps=10,
                       resume=base / "a" / "state-00000010", **FAST)
    assert foreign.read_bytes() == b"precious"
    with pytest.raises(SdfastError, match="loss.csv: exists"):              # another run's log
        train_finetune(*args, base / "a", "other", max_train_steps=2, **FAST)
    with pytest.raises(SdfastError, match="learning_rate was 0.002, now 0.001"):
        train_finetune(*args, tmp_path / "d", "tuned", max_train_steps=STEPS,
                       resume=base / "a" / "state-00000010", **{**FAST, "learning_rate": 1e-3})
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------- other stages
def test_text_encoder_training_with_accumulation_and_checkpointing(base):
    result = train_finetune(base / "tiny.safetensors", base / "data.toml", base / "te", "te",
                            max_train_steps=3, train_text_encoder=True, text_encoder_lr=1e-3,
                            gradient_accumulation_steps=2, gradient_checkpointing=True,
                            latents="mean", save_precision="fp16",
                            **{**FAST, "cache_latents": False})
    old, new = parts_sd(base / "tiny.safetensors"), parts_sd(result.output)
    assert all(v.dtype == torch.float16 for v in new["unet"].values())
    assert same({k: v.half() for k, v in old["vae"].items()}, new["vae"])
    assert not same(old["text"], new["text"]) and not same(old["unet"], new["unet"])


def test_vae_stage_trains_only_the_vae(base):
    before = fixed_vae_loss(base / "tiny.safetensors", base)
    result = train_finetune(base / "tiny.safetensors", base / "data.toml", base / "vae", "vae",
                            max_train_steps=12, train_vae=True,
                            **{**FAST, "cache_latents": False, "learning_rate": 1e-3})
    after = fixed_vae_loss(result.output, base)
    print(f"VAE loss per step {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
          f"fixed batch {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before        # 0.669 -> 0.601 here: 12 steps from a random VAE
    old, new = parts_sd(base / "tiny.safetensors"), parts_sd(result.output)
    assert same(old["unet"], new["unet"]) and same(old["text"], new["text"])
    assert not same(old["vae"], new["vae"])


def test_contradictory_options_are_refused(base, tmp_path):
    args = (base / "tiny.safetensors", base / "data.toml", tmp_path, "x")
    for kwargs, words in [({"train_vae": True, "cache_latents": True}, "cache_latents"),
                          ({"text_encoder_lr": 1e-4}, "needs train_text_encoder"),
                          ({"optimizer": "lion"}, "optimizer must be one of"),
                          ({"lr_warmup_steps": 5}, "needs a scheduler with warmup"),
                          ({"max_train_steps": 0}, "max_train_steps"),
                          ({"min_timestep": -1}, "min_timestep"),
                          ({"min_timestep": 500, "max_timestep": 500}, "must be above"),
                          ({"min_timestep": 1000}, "leaves no timestep")]:
        with pytest.raises(SdfastError, match=words):
            train_finetune(*args, **{"progress": False, **kwargs})


# ---------------------------------------------------------------------------- pieces
def test_gradient_checkpointing_gives_the_same_gradients():
    unet, _, text = tiny_models(1)
    objective = DiffusionObjective(unet, text, ModelSampling().alphas_cumprod, "eps", True)
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=gen), torch.randint(0, 49407, (2, 77), generator=gen),
            torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900]))

    def grads():
        objective.zero_grad()
        loss = objective(*args)
        loss.backward()
        return loss, [p.grad.clone() for p in objective.parameters()]
    calls = []
    unet.middle_block[0].register_forward_hook(lambda *_: calls.append(1))
    loss0, g0 = grads()
    assert len(calls) == 1
    assert enable_gradient_checkpointing(unet) == 9 and enable_gradient_checkpointing(text) == 2
    loss1, g1 = grads()
    assert len(calls) == 3                       # run again in the backward pass: recomputed
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_v_target_recovers_the_clean_latents():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    a = ModelSampling().alphas_cumprod[torch.tensor([0, 500, 999])]
    xt, v = noisy_latents(x0, eps, a), diffusion_target(x0, eps, a, "v")
    s = a.view(-1, 1, 1, 1)
    assert torch.allclose(s.sqrt() * xt - (1 - s).sqrt() * v, x0, atol=1e-5)
    assert diffusion_target(x0, eps, a, "eps") is eps


# ---------------------------------------------------------------------------- CLI
def test_cli_bad_config_is_one_line_exit_2(base, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[datasets]]\nresolution = 64\nbatch_sise = 2\n[[datasets.subsets]]\n'
                   f'image_dir = "{base / "data" / "images"}"\n')
    argv = ["finetune", "--model", str(base / "tiny.safetensors"), "--dataset-config", str(bad),
            "--output-dir", str(tmp_path / "out"), "--output-name", "x"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "datasets[0].batch_sise" in err[0] and str(bad) in err[0]
    assert train_main(argv[:-2]) == 2 and "required" in capsys.readouterr().err
    assert train_main(argv + ["--optimizer", "lion"]) == 2
    proc = subprocess.run([sys.executable, "-m", "sdfast.train", *argv], capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "batch_sise" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_register_adds_train_finetune(base):
    from sdfast.cli import _Parser
    from sdfast.train.cli import register

    parser = _Parser(prog="sdfast")
    register(parser.add_subparsers(dest="command", parser_class=_Parser))
    args = parser.parse_args(["train", "finetune", "--model", "m", "--dataset-config", "d.toml",
                              "--output-dir", "o", "--output-name", "n", "--max-train-steps", "5",
                              "--mixed-precision", "bf16", "--train-vae", "--kl-weight", "0"])
    assert (args.max_train_steps, args.mixed_precision, args.train_vae, args.kl_weight) == \
        (5, "bf16", True, 0.0)
    assert (args.learning_rate, args.save_precision, args.optimizer) == (1e-5, "fp32", "adamw")
    with pytest.raises(SdfastError, match="a method is required"):
        parser.parse_args(["train"]).func(None)


def test_latents_cached_to_disk_are_reused(base, run_a, tmp_path, monkeypatch):
    # the disk cache gives the in-memory cache's run exactly, and a later run sharing the
    # folder reads every latent back instead of running the VAE encoder
    from sdfast.models.vae import AutoencoderKL

    short = dict(FAST, max_train_steps=4)
    memory = train_finetune(base / "tiny.safetensors", base / "data.toml", tmp_path / "m", "t",
                            **short)
    first = train_finetune(base / "tiny.safetensors", base / "data.toml", tmp_path / "d", "t",
                           cache_latents_to_disk=True, **{**short, "cache_latents": False})
    cache = tmp_path / "d" / "latent-cache"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == N_IMAGES
    assert first.losses == memory.losses
    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: calls.append(1) or real(self, x))
    second = train_finetune(base / "tiny.safetensors", base / "data.toml", tmp_path / "e", "t",
                            cache_latents_to_disk=str(cache), **short)
    assert calls == [] and second.losses == memory.losses
    assert sorted(cache.glob("*.safetensors")) == files
    assert not (tmp_path / "e" / "latent-cache").exists()


def test_timestep_range_limits_the_drawn_timesteps(base, tmp_path, monkeypatch):
    # kohya's --min_timestep / --max_timestep: every drawn timestep in [min, max)
    from sdfast.train.objectives import DiffusionObjective

    seen = []
    real = DiffusionObjective.forward

    def spy(self, latents, input_ids, noise, timesteps, *args, **kwargs):
        seen.append(timesteps.clone())
        return real(self, latents, input_ids, noise, timesteps, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "forward", spy)
    train_finetune(base / "tiny.safetensors", base / "data.toml", tmp_path / "r", "t",
                   min_timestep=900, max_timestep=910, **dict(FAST, max_train_steps=3))
    drawn = torch.cat(seen)
    assert len(drawn) >= 3 and int(drawn.min()) >= 900 and int(drawn.max()) < 910


def test_cli_debiased_estimation_loss_reaches_the_objective(base, tmp_path, monkeypatch):
    # kohya's --debiased_estimation_loss: the flag turns the weighting on in the objective
    from sdfast.train.objectives import DiffusionObjective

    flags = []
    real = DiffusionObjective.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        flags.append(self.debiased_estimation)

    monkeypatch.setattr(DiffusionObjective, "__init__", spy)
    argv = ["finetune", "--model", str(base / "tiny.safetensors"), "--dataset-config",
            str(base / "data.toml"), "--output-dir", str(tmp_path / "o"), "--output-name", "x",
            "--max-train-steps", "1", "--cache-latents"]
    assert train_main(argv) == 0
    assert train_main([*argv[:5], "--output-dir", str(tmp_path / "p"), *argv[7:],
                       "--debiased-estimation-loss"]) == 0
    assert flags == [False, True]


def test_states_saved_before_later_options_still_resume(base, run_a):
    # min/max_timestep and debiased_estimation_loss came after runs were saving states: at their
    # default they are not recorded, so such a state resumes; set, they must be repeated.
    import json

    from sdfast.train.run import STATE_FILE

    shutil.copytree(base / "a", base / "old")
    state = base / "old" / "state-00000010"
    info = json.loads((state / STATE_FILE).read_text())
    assert not {"min_timestep", "max_timestep", "debiased_estimation_loss"} & set(info["settings"])
    args = (base / "tiny.safetensors", base / "data.toml", base / "old", "tuned")
    with pytest.raises(SdfastError, match="debiased_estimation_loss was None, now True"):
        train_finetune(*args, max_train_steps=11, resume=state, debiased_estimation_loss=True,
                       **FAST)
    info["settings"]["debiased_estimation_loss"] = True           # a state saved with it on
    (state / STATE_FILE).write_text(json.dumps(info))
    with pytest.raises(SdfastError, match="debiased_estimation_loss was True, now None"):
        train_finetune(*args, max_train_steps=11, resume=state, **FAST)
