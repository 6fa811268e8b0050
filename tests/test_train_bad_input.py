"""Bad input to `sdfast train`: non-finite numbers, a run that diverges, a damaged resume state
and a LoRA rank no layer has are each one line (SdfastError, exit 2 from the CLI), never a
traceback, a silent fallback or a NaN model left behind as a result."""
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _train_fixtures import one_thread, tiny_models  # noqa: F401
from sdfast.data.shapes import write_dataset
from sdfast.errors import SdfastError
from sdfast.io.save import save_checkpoint
from sdfast.train import train_finetune, train_lora
from sdfast.train.cli import main as train_main
from sdfast.train.losslog import plot_losses

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    save_checkpoint(root / "tiny.safetensors", *tiny_models(), "sd1")
    write_dataset(root / "data", 4, seed=0)
    (root / "data.toml").write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 4\n'
                                    f'[[datasets.subsets]]\nimage_dir = "{root}/data/images"\n')
    return root


def cli(base, out, *extra, method="lora", steps=1):
    return train_main([method, "--model", str(base / "tiny.safetensors"), "--dataset-config",
                       str(base / "data.toml"), "--output-dir", str(out), "--output-name", "l",
                       "--max-train-steps", str(steps), "--quiet", "--cache-latents", *extra])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------- nan / inf options
@pytest.mark.parametrize("method, flag, value", [
    ("lora", "--learning-rate", "nan"), ("lora", "--learning-rate", "inf"),
    ("lora", "--unet-lr", "nan"), ("lora", "--text-encoder-lr", "inf"),
    ("lora", "--weight-decay", "inf"), ("lora", "--max-grad-norm", "nan"),
    ("lora", "--prior-loss-weight", "nan"), ("lora", "--noise-offset", "nan"),
    ("lora", "--min-snr-gamma", "nan"), ("lora", "--network-alpha", "inf"),
    ("lora", "--conv-alpha", "-inf"), ("finetune", "--kl-weight", "nan"),
    ("dreambooth", "--prior-loss-weight", "inf")])
def test_cli_refuses_non_finite_numbers(base, tmp_path, capsys, method, flag, value):
    assert cli(base, tmp_path / "o", flag, value, method=method) == 2
    err = one_line_error(capsys)
    assert flag in err and "finite" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("function, key", [
    (train_lora, "learning_rate"), (train_lora, "unet_lr"), (train_lora, "weight_decay"),
    (train_lora, "max_grad_norm"), (train_lora, "prior_loss_weight"),
    (train_lora, "noise_offset"), (train_lora, "min_snr_gamma"), (train_lora, "network_alpha"),
    (train_finetune, "text_encoder_lr"), (train_finetune, "vae_edge_weight")])
def test_python_api_refuses_non_finite_numbers(base, tmp_path, function, key):
    for value in (NAN, INF, 10 ** 400):
        with pytest.raises(SdfastError, match=f"^{key} must be a finite number"):
            function(base / "tiny.safetensors", base / "data.toml", tmp_path / "o", "l",
                     max_train_steps=1, cache_latents=key != "vae_edge_weight",
                     progress=False, **{key: value})


# ---------------------------------------------------------------------------- divergence
def test_loss_plot_leaves_out_non_finite_losses():
    for rows in ([(1, NAN, 1e-4)], [(1, INF, 1e-4), (2, 0.5, 1e-4), (3, NAN, 1e-4)],
                 [(1, 1e10, 1e-4), (2, 1e10, 1e-4)], [(1, 0.3, 1e-4), (2, 0.2, NAN)]):
        assert plot_losses(rows).size == (720, 420)


def test_a_nan_loss_stops_the_run_without_saving_it(base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")            # a file the user had: kept
    assert cli(base, out, "--learning-rate", "1e30", "--save-every-n-steps", "1",
               steps=4) == 2
    err = one_line_error(capsys)
    match = re.search(r"training diverged: the loss is (nan|inf) at step (\d+) \(lower the "
                      r"learning rate\?\)", err)
    assert match, err
    bad = int(match.group(2))
    assert bad in (2, 3, 4)                           # step 1's loss is the model's own
    assert not (out / "l.safetensors").exists()
    for step in range(1, 5):                          # saves before it stay, whole and finite
        path = out / f"l-step{step:08d}.safetensors"
        assert path.exists() == (step < bad)
        assert (out / f"state-{step:08d}").exists() == (step < bad)
        if path.exists():
            assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "loss.png").exists()
    rows = (out / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + bad and not math.isfinite(float(rows[-1].split(",")[1]))


def test_non_finite_weights_are_not_saved(base, tmp_path, monkeypatch):
    real = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):               # step 2 leaves an inf in the LoRA
        out = real(self, *args, **kwargs)
        state = next(iter(self.state.values()))
        if int(state["step"]) == 2:
            self.param_groups[0]["params"][0].data.fill_(INF)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(SdfastError, match="trained weights are not finite after step 2"):
        train_lora(base / "tiny.safetensors", base / "data.toml", tmp_path / "o", "l",
                   max_train_steps=3, save_every_n_steps=2, cache_latents=True, progress=False)
    assert not (tmp_path / "o" / "l-step00000002.safetensors").exists()
    assert not (tmp_path / "o" / "state-00000002").exists()


def test_an_overflowing_learning_rate_is_one_line(base, tmp_path, capsys):
    assert cli(base, tmp_path / "o", "--learning-rate", "1e38") == 2
    assert "training diverged: the optimizer's update at step 1 overflows" in \
        one_line_error(capsys)
    assert not (tmp_path / "o" / "l.safetensors").exists()


# ---------------------------------------------------------------------------- damaged states
@pytest.fixture(scope="module")
def first_run(base):
    out = base / "first"
    assert cli(base, out, "--learning-rate", "1e-3") == 0
    return out


@pytest.mark.parametrize("name, text, words", [
    ("model.safetensors", "garbage", "unreadable training state file (SafetensorError"),
    ("optimizer.bin", "garbage", "unreadable training state file (not a file torch.save"),
    ("random_states_0.pkl", "garbage", "unreadable training state file (not a file torch.sav"),
    ("custom_checkpoint_0.pkl", "garbage", "unreadable training state file ("),
    ("sdfast_state.json", "{garbage", "unreadable training state (JSONDecodeError"),
    ("sdfast_state.json", '{"run_id": "x"}', "corrupt training state (missing or invalid: "
                                             "step, settings, losses)")])
def test_damaged_resume_state_is_one_line(base, first_run, tmp_path, capsys, name, text, words):
    out = tmp_path / "o"
    shutil.copytree(first_run, out)
    before = (out / "l.safetensors").read_bytes()
    (out / "state-00000001" / name).write_text(text)
    assert cli(base, out, "--learning-rate", "1e-3", "--resume", str(out), steps=2) == 2
    err = one_line_error(capsys)
    assert f"{out / 'state-00000001' / name}: {words}" in err, err
    assert (out / "l.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------- LoRA rank
def test_lora_rank_above_every_layer_is_refused(base, tmp_path, capsys):
    # the tiny model's widest layer: 64 channels (a rank above min(in, out) adds nothing)
    assert cli(base, tmp_path / "o", "--network-dim", "100000") == 2
    err = one_line_error(capsys)
    assert "network_dim 100000 is above the rank of every layer it trains" in err
    assert "64 for the widest layer" in err
    with pytest.raises(SdfastError, match="conv_dim 65 is above the rank"):
        train_lora(base / "tiny.safetensors", base / "data.toml", tmp_path / "p", "l",
                   conv_dim=65, network_train_unet_only=True, progress=False)
    assert not (tmp_path / "o" / "l.safetensors").exists()
