"""The built-in model: its architecture, and its training recipe end to end at toy scale."""
import json
from pathlib import Path

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


def test_recipe_end_to_end_at_toy_scale(tmp_path, monkeypatch):
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
    check_resume_runs_only_the_unfinished_stages(tmp_path / "run", monkeypatch)


def check_resume_runs_only_the_unfinished_stages(out, monkeypatch):
    import shutil

    from sdfast.builtin import recipe
    from sdfast.train import finetune

    from safetensors import safe_open
    from safetensors.torch import load_file

    def model(path=out / "sdfast-shapes.safetensors"):
        with safe_open(str(path), "pt") as f:
            return load_file(str(path)), f.metadata()

    first = model()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("stage[123]*/*.safetensors")}
    assert {p.parent.name for p in kept} == {"stage1-vae", "stage1-vae-crops", "stage2-unet",
                                             "stage3-layout"}
    shutil.rmtree(out / "stage4-recover")
    assert recipe.main([str(out), "--smoke"]) == 2                  # not empty: refused
    calls = []
    real = finetune.run_method

    def spy(method, o):
        calls.append(Path(o["output_dir"]).name)
        return real(method, o)

    monkeypatch.setattr(finetune, "run_method", spy)
    run(out, seed=0, settings=SMOKE, progress=False, resume=True)
    assert calls == ["stage4-recover"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept          # earlier stages untouched
    second = model()
    assert second[1] == first[1], (first[1], second[1])
    assert first[0].keys() == second[0].keys()
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])   # the same model again


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



def test_shipped_model_reads_the_position_words():
    # The third version ignored them (swapping "top left" for "bottom right" changed the
    # diffusion loss by < 1% at every timestep; position 7.5%). The shipped model's loss on 64
    # training scenes, noised to t = 700 and 850, must rise well above the right caption's when
    # the caption names the opposite place (measured: 6x and 5x).
    import dataclasses

    import numpy as np

    from sdfast.builtin import MODEL_PATH
    from sdfast.data.shapes import POSITIONS, caption_parts, render, train_specs
    from sdfast.io.load import load_components
    from sdfast.sampling import ModelSampling
    from sdfast.text.tokenizer import get_tokenizer
    from sdfast.train.objectives import VAE_SCALE, noisy_latents

    parts = load_components(MODEL_PATH)
    specs = train_specs()
    rng = np.random.default_rng(0)
    scenes = [specs[i] for i in rng.choice(len(specs), 64, replace=False)]
    moved = [dataclasses.replace(s, position=POSITIONS[8 - POSITIONS.index(s.position)])
             for s in scenes if s.position != "middle center"]
    scenes = [s for s in scenes if s.position != "middle center"]
    pixels = torch.stack([torch.from_numpy(np.array(render(s, np.random.default_rng(i))))
                          for i, s in enumerate(scenes)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    tok, alphas = get_tokenizer(), ModelSampling().alphas_cumprod
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latents = parts.vae.encode(pixels).mean * VAE_SCALE
        right, wrong = (parts.text_encoder(tok([caption_parts(s)[0] for s in group]))
                        for group in (scenes, moved))
        for t in (700, 850):
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((len(scenes),), t)
            x = noisy_latents(latents, noise, alphas[steps])
            loss = [float((parts.unet(x, steps.float(), c) - noise).pow(2).mean())
                    for c in (right, wrong)]
            assert loss[1] > 2 * loss[0], (t, loss)
