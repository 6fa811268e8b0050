"""Checkpoint reading, pickle safety, family detection and PNG metadata."""
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdfast.errors import CheckpointError, SdfastError
from sdfast.io.checkpoint import REFUSED_PICKLE, read_checkpoint
from sdfast.io.detect import detect, split_components
from sdfast.io.png import a1111_parameters, free_paths, save_png

U = "model.diffusion_model."


def fake_sd(family="sd1", in_channels=4, v_probe_std=None, sdxl=False):
    """Keys and shapes as real checkpoints have them; tiny tensors where shapes do not matter."""
    sd = {U + "input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
          "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}
    if family == "sd1":
        sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(4)
    else:
        sd["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"] = torch.ones(4)
    if v_probe_std is not None:
        probe = torch.randn(1280, generator=torch.Generator().manual_seed(0))
        sd[U + "output_blocks.11.1.transformer_blocks.0.norm1.bias"] = probe * v_probe_std
    if sdxl:
        sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    return sd


class Evil:
    """Unpickling this runs a shell command (if the loader ever executed pickled code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_is_read_lazily_with_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(path), metadata={"k": "v"})
    tensors, metadata = read_checkpoint(path)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
    assert metadata == {"k": "v"}


def test_ckpt_nested_state_dict_is_flattened(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": np.int64(7)}, path)
    tensors, _ = read_checkpoint(path)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.ones(3))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match=REFUSED_PICKLE):
        read_checkpoint(path)
    assert not marker.exists()


def test_legacy_plain_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"payload": Evil(str(marker))}, fh)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_lightning_callback_state_loads_as_inert_data(tmp_path, monkeypatch):
    # Real SD1.x .ckpt files pickle PyTorch Lightning's ModelCheckpoint; we must read the
    # weights without importing (or running) Lightning.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 0.5

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod)
    path = tmp_path / "pl.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": ModelCheckpoint()}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    tensors, _ = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(2))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(bad)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_detect_family_and_inpaint(family):
    assert detect(fake_sd(family)).as_dict() == {"family": family, "prediction": "eps",
                                                 "inpaint": False}
    assert detect(fake_sd(family, in_channels=9)).inpaint


def test_detect_prediction_sources():
    assert detect(fake_sd("sd2", v_probe_std=0.2)).prediction == "v"       # heuristic
    assert detect(fake_sd("sd2", v_probe_std=0.01)).prediction == "eps"
    assert detect(fake_sd("sd1", v_probe_std=0.2)).prediction == "eps"      # SD2-only heuristic
    assert detect(fake_sd("sd1"), {"sdfast.prediction": "v"}).prediction == "v"
    assert detect(fake_sd("sd1"), {"modelspec.prediction_type": "v"}).prediction == "v"
    assert detect({**fake_sd("sd1"), "v_pred": torch.zeros(0)}).prediction == "v"
    assert detect(fake_sd("sd2", v_probe_std=0.2), prediction="eps").prediction == "eps"
    with pytest.raises(CheckpointError, match="unknown prediction"):
        detect(fake_sd("sd1"), prediction="x0")


def test_detect_refuses_sdxl_and_unknown_files():
    with pytest.raises(CheckpointError, match="SDXL"):
        detect(fake_sd(sdxl=True))
    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet.*2 tensors"):
        detect({"foo.weight": torch.zeros(1), "bar.weight": torch.zeros(1)})
    sd = fake_sd("sd1")
    del sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    del sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    with pytest.raises(CheckpointError, match="no SD1 .* or SD2 .* text encoder"):
        detect(sd)


def test_split_components_strips_prefixes_and_position_ids():
    sd = fake_sd("sd1")
    sd["cond_stage_model.transformer.embeddings.token_embedding.weight"] = torch.zeros(2, 2)
    unet, vae, text = split_components(sd, "sd1")
    assert list(unet) == ["input_blocks.0.0.weight"]
    assert list(vae) == ["decoder.conv_out.weight"]
    # position_ids dropped; the old SD1 layout without `text_model.` gains it
    assert sorted(text) == ["text_model.embeddings.token_embedding.weight",
                            "text_model.final_layer_norm.weight"]
    assert unet["input_blocks.0.0.weight"] is sd[U + "input_blocks.0.0.weight"]   # no copy


def test_a1111_parameters_text():
    text = a1111_parameters("a cat", "blurry", steps=20, sampler="euler_ancestral",
                            scheduler="karras", cfg=7.0, seed=42, width=512, height=768,
                            model_hash="0123456789", model_name="m", clip_skip=2)
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                    "Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
                    "Model hash: 0123456789, Model: m, Clip skip: 2")
    plain = a1111_parameters("x", "", steps=4, sampler="euler", scheduler="normal", cfg=5.5,
                             seed=1, width=64, height=64)
    assert plain == "x\nSteps: 4, Sampler: Euler, CFG scale: 5.5, Seed: 1, Size: 64x64"


def test_save_png_never_overwrites(tmp_path):
    path = tmp_path / "out.png"
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    save_png(img, path, "first")
    with pytest.raises(SdfastError, match="exists"):
        save_png(Image.new("RGB", (8, 8)), path, "second")
    with Image.open(path) as reread:
        assert reread.text["parameters"] == "first"
        assert reread.getpixel((0, 0)) == (255, 0, 0)
    save_png(Image.new("RGB", (8, 8)), path, "third", overwrite=True)
    with Image.open(path) as reread:
        assert reread.text["parameters"] == "third"


def test_free_paths_numbers_taken_names(tmp_path):
    base = tmp_path / "out.png"
    assert free_paths(str(base), 2) == [str(base), str(tmp_path / "out-1.png")]
    base.write_bytes(b"")
    (tmp_path / "out-2.png").write_bytes(b"")
    assert free_paths(str(base), 2) == [str(tmp_path / "out-1.png"), str(tmp_path / "out-3.png")]
    assert free_paths(str(base), 1, overwrite=True) == [str(base)]
