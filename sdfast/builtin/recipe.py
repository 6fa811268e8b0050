"""The built-in model's training recipe: `python -m sdfast.builtin.recipe OUT_DIR [--seed 0]`.

From nothing to the shipped checkpoint on 2 CPU cores (about 1 h 50 min with one torch thread,
the machine's other core busy; `OMP_NUM_THREADS=1` is the better setting on a shared machine):
1. generate the shapes training set (held-out combinations excluded) as a kohya folder;
2. write the random starting checkpoint of the built-in architecture;
3. `sdfast train finetune --train-vae`: the VAE alone, as an autoencoder, with extra loss weight
   on the shapes and more on their outlines (`--vae-foreground-weight`, `--vae-edge-weight`),
   first on 32x32 windows around the shapes (`--vae-crop 32`: four times the shapes per second;
   the outlines, which tell circles from squares, learn here), then briefly on whole images
   (borders, colours, the global attention); then its ceiling is measured (held-out ground truth
   through the VAE, read by the analyser) and its latents rescaled so that, times SD's 0.18215,
   they have unit standard deviation (`normalise_latents_`: an exact change of the 1x1 convs
   around the latent, so every SD loader decodes it unchanged);
4. `sdfast train finetune --train-text-encoder`: the UNet and text encoder on the diffusion loss
   (Min-SNR weighted), with captions dropped at random so classifier-free guidance has an
   unconditional model;
5. the layout stage: the same, on the noisiest timesteps only (`--min-timestep 800`). The eps
   loss weighs an error in the predicted image by SNR(t), 0.005-0.02 there, so the full-range
   stage learns colour, shape and size but never where the prompt puts the shape (position
   7.5%, chance 11%: the place came from the noise; swapping the position words for the
   opposite place changed the loss by less than 1%). Here the layout is most of the loss, and
   the model learns to read it from the text;
6. the recovery stage: the whole range again, briefly, at a lower rate (the layout stage alone
   lets colour, shape and background drift to 75%, 70% and 73%);
7. save the result in fp16 as `OUT_DIR/sdfast-shapes.safetensors` (copy it to
   `sdfast/builtin/` to ship it) and evaluate it on held-out prompts.

`--resume` continues in an OUT_DIR an earlier run left: every stage whose output file is there
is taken as done (the data, the VAE, and each UNet stage), the rest run as above.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Recipe settings (the README quotes the command; change them here only).
FULL = dict(dataset_size=6000, vae_batch=16, vae_crop=32, vae_crop_steps=4000, vae_crop_lr=1e-3,
            vae_crop_edge_weight=20.0, vae_steps=500, vae_lr=5e-4, vae_edge_weight=5.0,
            vae_foreground_weight=5.0, latent_stats_n=512, unet_steps=3000, unet_batch=64,
            unet_lr=6e-4, text_lr=3e-4, min_snr_gamma=5.0, caption_dropout=0.1,
            layout_steps=1500, layout_min_timestep=800, layout_lr=3e-4, recover_steps=1000,
            recover_lr=1e-4, eval_n=200)
# The same recipe at toy scale, to check the whole path in seconds (`--smoke`, and the tests).
SMOKE = dict(FULL, dataset_size=32, vae_crop_steps=3, vae_steps=3, vae_batch=4,
             latent_stats_n=16, unet_steps=3, unet_batch=8, layout_steps=2, recover_steps=2,
             eval_n=2)


def dataset_toml(image_dir, batch_size, caption_dropout=0.0):
    """A kohya dataset config for one folder of 64x64 images with .txt captions."""
    from . import RESOLUTION

    dropout = f"caption_dropout_rate = {caption_dropout}\n" if caption_dropout else ""
    return (f"[general]\ncaption_extension = \".txt\"\nenable_bucket = false\n\n"
            f"[[datasets]]\nresolution = {RESOLUTION}\nbatch_size = {batch_size}\n\n"
            f"[[datasets.subsets]]\nimage_dir = \"{image_dir}\"\n{dropout}")


@torch.no_grad()
def normalise_latents_(vae, pixels):
    """Rescale `vae` in place so that the posterior means of `pixels` `[N, 3, H, W]` (in
    [-1, 1]) times `VAE_SCALE` have standard deviation 1, the scale diffusion schedules assume.
    The mean rows of `quant_conv` are multiplied by `s`, its log-variance biases shifted by
    `2 log s`, and `post_quant_conv`'s inputs divided by `s`: decode(encode(x)) is unchanged.
    Returns `s`."""
    from ..train.objectives import VAE_SCALE

    e = vae.config.embed_dim
    std = torch.cat([vae.encode(pixels[i:i + 64]).mean for i in range(0, len(pixels), 64)]).std()
    s = 1.0 / (VAE_SCALE * float(std))
    vae.quant_conv.weight[:e] *= s
    vae.quant_conv.bias[:e] *= s
    vae.quant_conv.bias[e:] += 2 * math.log(s)
    vae.post_quant_conv.weight /= s
    return s


def _training_pixels(image_dir, count):
    """The first `count` training images (sorted names) as `[N, 3, H, W]` in [-1, 1]."""
    from PIL import Image

    files = sorted(Path(image_dir).glob("*.png"))[:count]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def run(out_dir, seed=0, settings=FULL, progress=True, resume=False):
    from ..data.shapes import write_dataset
    from ..io.load import load_components
    from ..io.save import save_checkpoint
    from ..train import train_finetune
    from . import MODEL_NAME, init_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    start = time.perf_counter()
    s = settings

    def done(folder, name):
        """The output a finished stage left (only when resuming), else None."""
        path = out / folder / f"{name}.safetensors"
        return path if resume and path.exists() else None

    if resume and (out / "data" / "metadata.jsonl").exists():
        images = (out / "data" / "images").resolve()
    else:
        images = write_dataset(out / "data", s["dataset_size"], seed, split="train").resolve()
    (out / "vae.toml").write_text(dataset_toml(images, s["vae_batch"]))
    (out / "unet.toml").write_text(dataset_toml(images, s["unet_batch"], s["caption_dropout"]))
    init = init_checkpoint(out / "init.safetensors", seed=seed, overwrite=resume)
    times["data+init"] = time.perf_counter() - start

    def vae_stage(model, folder, steps, lr, edge_weight, crop=None):
        return train_finetune(model, out / "vae.toml", out / folder, "vae", train_vae=True,
                              vae_crop=crop, vae_foreground_weight=s["vae_foreground_weight"],
                              vae_edge_weight=edge_weight, max_train_steps=steps,
                              learning_rate=lr, lr_scheduler="cosine",
                              lr_warmup_steps=min(50, steps // 2), seed=seed, progress=progress)

    report, losses = {}, {}
    vae_model = done("stage1-vae", "vae-normalised")
    if vae_model is None:
        start = time.perf_counter()
        crops = vae_stage(init, "stage1-vae-crops", s["vae_crop_steps"], s["vae_crop_lr"],
                          s["vae_crop_edge_weight"], crop=s["vae_crop"])
        times["vae crops"] = time.perf_counter() - start

        start = time.perf_counter()
        vae = vae_stage(crops.output, "stage1-vae", s["vae_steps"], s["vae_lr"],
                        s["vae_edge_weight"])
        times["vae"] = time.perf_counter() - start
        losses.update({"vae crops": crops.losses[-20:], "vae": vae.losses[-20:]})

        start = time.perf_counter()
        stage1 = load_components(vae.output)
        if s["eval_n"]:
            report["vae_ceiling"] = _ceiling(stage1.vae, s["eval_n"], seed)
        report["latent_rescale"] = normalise_latents_(
            stage1.vae, _training_pixels(images, s["latent_stats_n"]))
        vae_model = save_checkpoint(out / "stage1-vae" / "vae-normalised.safetensors",
                                    stage1.unet, stage1.vae, stage1.text_encoder, "sd1",
                                    metadata={"sdfast.model": f"{MODEL_NAME}-vae"})
        times["vae ceiling+rescale"] = time.perf_counter() - start
    elif s["eval_n"]:                         # the rescale is exact: the same ceiling
        report["vae_ceiling"] = _ceiling(load_components(vae_model).vae, s["eval_n"], seed)

    def unet_stage(model, folder, steps, lr, text_lr, **kwargs):
        """UNet and text encoder on the diffusion loss; the stage's output file."""
        finished = done(folder, "unet")
        if finished is not None:
            return finished
        start = time.perf_counter()
        result = train_finetune(model, out / "unet.toml", out / folder, "unet",
                                train_text_encoder=True, text_encoder_lr=text_lr,
                                max_train_steps=steps, learning_rate=lr, lr_scheduler="cosine",
                                cache_latents=True, latents="mean", seed=seed,
                                progress=progress, **kwargs)
        times[folder] = time.perf_counter() - start
        losses[folder] = result.losses[-20:]
        return result.output

    unet = unet_stage(vae_model, "stage2-unet", s["unet_steps"], s["unet_lr"], s["text_lr"],
                      min_snr_gamma=s["min_snr_gamma"],
                      lr_warmup_steps=min(100, s["unet_steps"] // 2),
                      save_every_n_steps=max(1, s["unet_steps"] // 6))
    layout = unet_stage(unet, "stage3-layout", s["layout_steps"], s["layout_lr"], s["layout_lr"],
                        min_timestep=s["layout_min_timestep"],
                        lr_warmup_steps=min(20, s["layout_steps"] // 2),
                        save_every_n_steps=max(1, s["layout_steps"] // 4))
    recovered = unet_stage(layout, "stage4-recover", s["recover_steps"], s["recover_lr"],
                           s["recover_lr"], min_snr_gamma=s["min_snr_gamma"],
                           lr_warmup_steps=min(20, s["recover_steps"] // 2))

    parts = load_components(recovered)
    final = save_checkpoint(out / f"{MODEL_NAME}.safetensors", parts.unet, parts.vae,
                            parts.text_encoder, "sd1", dtype=torch.float16, overwrite=resume,
                            metadata={"sdfast.model": MODEL_NAME, "sdfast.seed": seed,
                                      "sdfast.recipe": "python -m sdfast.builtin.recipe"})
    report.update(model=str(final), settings=s, size_mb=os.path.getsize(final) / 1e6,
                  seconds=times, final_losses=losses)
    if s["eval_n"]:
        import sdfast
        from ..eval.shapes_eval import evaluate, format_table

        result = evaluate(sdfast.load(final), n=s["eval_n"], seed=seed)
        print(format_table(result))
        report["eval"] = {k: v for k, v in result.items() if k != "rows"}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return final


def _ceiling(vae, n, seed):
    """Accuracy of held-out ground truth passed through `vae` (what any UNet can reach)."""
    from ..eval.shapes_eval import RoundTrip, evaluate, format_table

    result = evaluate(RoundTrip(vae), n=n, seed=seed)
    print("VAE ceiling:\n" + format_table(result))
    return result["accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sdfast.builtin.recipe")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="toy scale, seconds")
    parser.add_argument("--resume", action="store_true",
                        help="continue in OUT_DIR: the stages whose output is there are done")
    args = parser.parse_args(argv)
    if not args.resume and Path(args.out_dir).exists() and any(Path(args.out_dir).iterdir()):
        print(f"error: {args.out_dir} is not empty (--resume continues the run there)",
              file=sys.stderr)
        return 2
    print(run(args.out_dir, seed=args.seed, settings=SMOKE if args.smoke else FULL,
              resume=args.resume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
