"""The built-in model: its architecture, and its training recipe end to end at toy scale."""
import json

import torch

import sdfast
from sdfast.builtin import configs, init_models
from sdfast.builtin.recipe import SMOKE, run


def test_architecture_is_sd15_shaped_and_fits_30mb_in_fp16():
    unet_cfg, vae_cfg, text_cfg = configs()
    assert len(unet_cfg.channel_mult) == 4 and unet_cfg.attention_levels == (0, 1, 2)
    assert len(vae_cfg.ch_mult) == 4                       # 8x latent downsampling, as SD
    assert text_cfg.vocab_size == 49408                    # the real CLIP tokenizer
    params = sum(p.numel() for m in init_models() for p in m.parameters())
    assert params * 2 < 30e6


def test_recipe_end_to_end_at_toy_scale(tmp_path):
    final = run(tmp_path / "run", seed=0, settings=SMOKE, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["dataset_size"] == SMOKE["dataset_size"]
    assert report["size_mb"] < 30
    pipe = sdfast.load(final)
    assert pipe.info["family"] == "sd1"
    assert next(pipe.unet.parameters()).dtype == torch.float32      # fp16 file, fp32 on the CPU
    init = sdfast.load(tmp_path / "run" / "init.safetensors")
    changed = [name for name in ("unet", "vae", "text_encoder")
               if any(not torch.equal(a.half().float(), b) for a, b in
                      zip(getattr(init, name).parameters(), getattr(pipe, name).parameters()))]
    assert changed == ["unet", "vae", "text_encoder"]              # every stage trained its part
