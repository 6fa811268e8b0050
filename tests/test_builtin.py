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


def test_random_start_text_encoder_tells_prompts_apart():
    # With nn.Embedding's N(0, 1) position init the positions drowned the tokens (std 0.02): two
    # prompts that differ in one word encoded 0.1% apart, and the UNet trained on that context
    # learned to ignore it. CLIP's init (positions std 0.01) keeps the words visible.
    from sdfast.text.tokenizer import get_tokenizer

    _, _, text = init_models(seed=0)
    ids = get_tokenizer()(["a red circle on a blue background", "a red circle on a green background"])
    with torch.no_grad():
        context = text(ids)
    word = 6                                  # BOS a red circle on a | blue or green
    assert (context[0, :word] == context[1, :word]).all()          # causal: earlier tokens equal
    diff = (context[0, word:] - context[1, word:]).abs().mean() / context.std()
    assert diff > 0.05, float(diff)
