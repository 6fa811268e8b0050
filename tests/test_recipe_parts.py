"""The pieces the built-in model's recipe adds to training: Min-SNR weighting, the VAE's
foreground weighting, the latent rescale, the VAE ceiling (`RoundTrip`), the log-variance init."""
import numpy as np
import pytest
import torch

from sdfast.builtin import LOGVAR_INIT, configs, init_models
from sdfast.builtin.recipe import normalise_latents_
from sdfast.data.shapes import ShapeSpec, coverage, placement, render
from sdfast.errors import SdfastError
from sdfast.eval.shapes_eval import RoundTrip, evaluate
from sdfast.models.vae import AutoencoderKL, VAEConfig
from sdfast.sampling import ModelSampling
from sdfast.train.objectives import (FOREGROUND_THRESHOLD, VAE_SCALE, DiffusionObjective,
                                     VAEObjective, foreground_crops, foreground_mask,
                                     debiased_weight, min_snr_weight, pixel_weights)

SPEC = ShapeSpec("circle", "red", "top left", "large", "blue")


def _pixels(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_foreground_mask_is_the_shape():
    rng = np.random.default_rng(3)
    place = placement(SPEC, rng)
    from sdfast.data.shapes import draw

    mask = foreground_mask(_pixels(draw(SPEC, place)))[0, 0].numpy()
    cover = coverage(SPEC.shape, place["cx"], place["cy"], place["extent"])
    # red vs blue differ by far more than the threshold, so every pixel the shape covers by
    # more than a few percent is foreground, and no uncovered pixel is
    assert mask[cover > 0.1].all() and not mask[cover == 0].any()
    assert 0.03 < mask.mean() < 0.1                  # a large shape: ~250 of 4096 pixels


def test_pixel_weights_mark_the_outline():
    images = -torch.ones(1, 3, 16, 16)
    images[:, :, 4:10, 5:12] = 1.0                              # a 6x7 white box on black
    w = pixel_weights(images, 2.0, 10.0)[0, 0]
    fg = torch.zeros(16, 16)
    fg[4:10, 5:12] = 1
    ring_out = torch.zeros(16, 16)
    ring_out[3:11, 4:13] = 1
    ring_in = torch.zeros(16, 16)
    ring_in[5:9, 6:11] = 1
    outline = ring_out - ring_in                                # one pixel either side of the edge
    assert torch.equal(w, 1 + 2 * fg + 10 * outline)


def test_foreground_crops_hold_the_shape():
    specs = [SPEC, ShapeSpec("square", "green", "middle center", "small", "white")]
    images = torch.cat([_pixels(render(specs[i % 2], np.random.default_rng(i))) for i in range(4)])
    g = torch.Generator().manual_seed(0)
    crops = foreground_crops(images, 32, g)
    assert crops.shape == (4, 3, 32, 32)
    for full, crop in zip(images, crops):
        # the crop is a window of the image whose centre is within 8 px (+1 for rounding) of
        # the foreground's centroid on each axis
        where = [(y, x) for y in range(33) for x in range(33)
                 if torch.equal(full[:, y:y + 32, x:x + 32], crop)]
        assert where
        ys, xs = torch.nonzero(foreground_mask(full[None])[0, 0], as_tuple=True)
        cy, cx = float(ys.float().mean()), float(xs.float().mean())
        assert any(abs(y + 16 - cy) <= 9 and abs(x + 16 - cx) <= 9 for y, x in where)
        assert foreground_mask(crop[None]).sum() > 0.5 * foreground_mask(full[None]).sum()
    again = foreground_crops(images, 32, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    with pytest.raises(ValueError, match="crop of 80 px"):
        foreground_crops(images, 80, g)


def test_foreground_weight_changes_only_the_weighting():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    images = torch.cat([_pixels(render(SPEC, np.random.default_rng(i))) for i in range(2)])
    images = torch.nn.functional.avg_pool2d(images, 2)                 # [2, 3, 32, 32]
    eps = torch.zeros(2, 4, 16, 16)
    plain = VAEObjective(vae, "l1", kl_weight=0.0)(images, eps)
    weighted = VAEObjective(vae, "l1", kl_weight=0.0, foreground_weight=4.0)(images, eps)
    with torch.no_grad():
        err = (vae.decode(vae.encode(images).mean) - images).abs()
    fg = foreground_mask(images)
    expected = (err * (1 + 4.0 * fg)).flatten(1).sum(1).mean() / images[0].numel()
    assert torch.allclose(weighted, expected, rtol=1e-5)
    assert torch.allclose(plain, err.mean(), rtol=1e-5)
    assert FOREGROUND_THRESHOLD == 0.1


def test_min_snr_weight():
    a = torch.tensor([0.999, 0.9, 0.5, 0.01])             # SNR 999, 9, 1, ~0.0101
    snr = a / (1 - a)
    w = min_snr_weight(a, 5.0)
    assert torch.allclose(w, torch.tensor([5.0 / 999, 5.0 / 9, 1.0, 1.0]), rtol=1e-4)
    assert torch.allclose(min_snr_weight(a, 5.0, "v"), snr.clamp(max=5) / (snr + 1))


def test_debiased_weight():
    a = torch.tensor([0.9999999, 0.9, 0.5, 0.01])        # SNR ~1e7 (capped at 1000), 9, 1, ~0.0101
    snr = (a / (1 - a)).clamp(max=1000)
    assert torch.allclose(debiased_weight(a), torch.tensor([1000 ** -0.5, 1 / 3, 1.0, 0.01 ** -0.5 * 0.99 ** 0.5]),
                          rtol=1e-4)
    assert torch.allclose(debiased_weight(a, "v"), 1 / (snr + 1))


@pytest.mark.parametrize("option", ["min_snr", "debiased", "both"])
def test_loss_weighting_objective_weights_each_item(option):
    torch.manual_seed(0)
    unet_cfg, _, text_cfg = configs()
    unet, _, text = init_models(seed=1)
    for p in unet.parameters():                         # break the zero init: a real output
        p.data.normal_(0, 0.02)
    alphas = ModelSampling().alphas_cumprod
    plain = DiffusionObjective(unet, text, alphas)
    weighted = DiffusionObjective(unet, text, alphas,
                                  min_snr_gamma=None if option == "debiased" else 5.0,
                                  debiased_estimation=option != "min_snr")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ids = torch.zeros(2, 77, dtype=torch.long)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        per = torch.stack([plain(latents[i:i + 1], ids[:1], noise[i:i + 1], t[i:i + 1])
                           for i in range(2)])
        got = weighted(latents, ids, noise, t)
    a = alphas[t].float()
    snr = a / (1 - a)
    w = torch.ones(2)
    if option != "debiased":
        w *= min_snr_weight(a, 5.0)
        assert w[0] < 0.1 and w[1] == 1.0               # t=10 is nearly clean: down-weighted
    if option != "min_snr":
        w *= snr.rsqrt()                                  # t=900 (SNR 0.02): weight ~7
        assert snr[1].rsqrt() > 5 and snr[0].rsqrt() < 0.5
    assert torch.allclose(got, (per * w).mean(), rtol=1e-4)


def test_normalise_latents_is_exact_and_unit_scaled():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).mean)
        before_logvar = vae.encode(x).logvar
    s = normalise_latents_(vae, x)
    with torch.no_grad():
        posterior = vae.encode(x)
        after = vae.decode(posterior.mean)
    assert s != pytest.approx(1.0)
    assert float((posterior.mean * VAE_SCALE).std()) == pytest.approx(1.0, rel=1e-9)
    assert torch.allclose(after, before, rtol=1e-9, atol=1e-12)          # same decoder output
    assert torch.allclose(posterior.std / s, (0.5 * before_logvar).exp(), rtol=1e-9)


def test_roundtrip_ground_truth_reads_back_perfectly():
    result = evaluate(RoundTrip(), n=24, seed=5)
    assert all(result["accuracy"][k] == 1.0 for k in ("color", "shape", "position", "size",
                                                       "background"))


def test_roundtrip_through_a_vae_is_the_vae_ceiling():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))   # untrained
    result = evaluate(RoundTrip(vae), n=8, seed=0)
    assert result["accuracy"]["color"] < 0.5               # an untrained VAE loses the scene
    image = RoundTrip(vae).generate(result["samples"][0]["prompt"], seed=0)[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_builtin_vae_starts_with_a_small_posterior_variance():
    _, vae, _ = init_models(seed=0)
    e = vae.config.embed_dim
    assert (vae.quant_conv.bias[e:] == LOGVAR_INIT).all()
    with torch.no_grad():
        std = vae.encode(torch.zeros(1, 3, 64, 64)).std
    assert std.max() < 0.2


def test_loss_weightings_are_checked(tmp_path):
    from sdfast.train import train_finetune

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    config = tmp_path / "d.toml"
    config.write_text("")
    with pytest.raises(SdfastError, match="vae_foreground_weight needs train_vae"):
        train_finetune(model, config, tmp_path, "x", vae_foreground_weight=2.0)
    with pytest.raises(SdfastError, match="min_snr_gamma does not apply"):
        train_finetune(model, config, tmp_path, "x", train_vae=True, min_snr_gamma=5.0)
    with pytest.raises(SdfastError, match="min_snr_gamma must be a positive number"):
        train_finetune(model, config, tmp_path, "x", min_snr_gamma=-1.0)
    with pytest.raises(SdfastError, match="debiased_estimation_loss does not apply"):
        train_finetune(model, config, tmp_path, "x", train_vae=True, debiased_estimation_loss=True)
    with pytest.raises(SdfastError, match="debiased_estimation_loss must be True or False"):
        train_finetune(model, config, tmp_path, "x", debiased_estimation_loss="yes")
    with pytest.raises(SdfastError, match="vae_edge_weight needs train_vae"):
        train_finetune(model, config, tmp_path, "x", vae_edge_weight=1.0)
    with pytest.raises(SdfastError, match="vae_crop needs train_vae"):
        train_finetune(model, config, tmp_path, "x", vae_crop=32)
