"""Training losses as nn.Modules, so that accelerate can wrap them (DDP, autocast) whole.

Diffusion (Ho et al. 2020, as in LDM's `DDPM.p_losses`, Rombach et al. 2022): with
`a = alphas_cumprod[t]`, `x_t = sqrt(a) * x_0 + sqrt(1 - a) * eps`; the UNet sees `x_t`, the
integer timestep `t` and the text context, and the loss is the MSE between its output and `eps`
(eps models) or `v = sqrt(a) * eps - sqrt(1 - a) * x_0` (v models, Salimans & Ho 2022).
`x_0` are VAE latents times 0.18215. With per-image `weights` (DreamBooth's prior-preservation
weight on class images) the loss is kohya's `mean_i(w_i * mse_i)`, `mse_i` the mean over image
i's elements; diffusers' `mse(instance) + w * mse(class)` over a half-and-half batch is twice that.

Method-specific inputs: `slots` (textual inversion) puts trainable vectors in place of
placeholder tokens, as the pipeline places embeddings at inference (`Pipeline._encode_ids`);
`hints` (ControlNet) feeds the conditioning images to the ControlNet, whose residuals the UNet
adds (`UNetModel.forward(..., control=)`).

Autoencoder (LDM's `AutoencoderKL` with `LPIPSWithDiscriminator` minus LPIPS and the
discriminator): `x -> q(z|x) -> z ~ q -> decoder(z)`; LDM sums the L1 reconstruction error over
pixels and `kl_weight * KL(q || N(0, 1))` over latent elements, per image. Here both are divided
by the number of pixel values per image (same optimum and the same `kl_weight` meaning; the
logged loss reads as a per-pixel error).

Options for small data sets and small models:
- `min_snr_gamma` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy", kohya's `--min_snr_gamma`): each timestep's loss is weighted by
  `min(SNR(t), gamma) / SNR(t)` for eps models (`/ (SNR(t) + 1)` for v models), with
  `SNR(t) = a / (1 - a)`, so the many nearly-clean timesteps stop dominating the gradient.
- `debiased_estimation` (kohya's `--debiased_estimation_loss`): each timestep's loss is weighted
  by `1 / sqrt(SNR(t))` (`1 / (SNR(t) + 1)` for v models), SNR capped at 1000, on top of Min-SNR
  when both are on. The eps loss counts an error in the predicted image `x_0` times `SNR(t)`,
  which at the noisiest timesteps is 0.005: what decides an image's layout (where a shape goes)
  then weighs a thousandth of the loss. (For the built-in model a stage on those timesteps
  alone, `min_timestep`, taught the layout; this weighting had not started to after 500 steps.)
- `foreground_weight` and `edge_weight` (autoencoder): pixels whose colour differs from the
  image's border colour (the per-channel median of the outermost pixel ring) by more than
  `FOREGROUND_THRESHOLD` in any channel get `foreground_weight` more weight, and pixels on the
  outline of that foreground (within one pixel of its edge, inside or out) `edge_weight` more.
  For images of objects on plain backgrounds, where the objects are a few percent of the pixels:
  unweighted, the loss learns the background first and the objects hardly at all, and with the
  foreground alone it learns their colours long before their outlines (measured on the built-in
  model's shapes: circles, squares and triangles all came back as rounded squares).
  `foreground_crops` cuts training windows around the foreground, so the same compute sees
  four times the objects at a quarter of the image area.
"""
import torch
import torch.nn.functional as F
from torch import nn

VAE_SCALE = 0.18215     # SD1.x / SD2.x latent scale factor (as sdfast.pipeline.VAE_SCALE)
VAE_LOSSES = ("l1", "mse")
FOREGROUND_THRESHOLD = 0.1   # in the [-1, 1] pixel range: 12.75 of 255


def noisy_latents(latents, noise, alphas_cumprod):
    """`sqrt(a) * x_0 + sqrt(1 - a) * eps` with `alphas_cumprod` `[B]` broadcast."""
    a = alphas_cumprod.view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def diffusion_target(latents, noise, alphas_cumprod, prediction):
    """What the UNet learns to output: `eps`, or `v` for v-prediction models."""
    if prediction == "eps":
        return noise
    a = alphas_cumprod.view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


class DiffusionObjective(nn.Module):
    """`forward(latents, input_ids, noise, timesteps, weights=None, slots=None, hints=None)` ->
    MSE of the UNet against its target (module docstring).

    The text encoder runs with gradients only when `train_text_encoder` (also needed when only
    something inside it trains: LoRA layers, `token_vectors`). `token_vectors` `[n, C]`: the
    textual-inversion vectors that `slots` `[B, 77]` (vector index, -1 elsewhere) place.
    `controlnet`: a ControlNetModel fed `hints`."""

    def __init__(self, unet, text_encoder, alphas_cumprod, prediction="eps",
                 train_text_encoder=False, token_vectors=None, controlnet=None,
                 min_snr_gamma=None, debiased_estimation=False):
        super().__init__()
        self.min_snr_gamma = min_snr_gamma
        self.debiased_estimation = debiased_estimation
        self.unet = unet
        self.text_encoder = text_encoder
        self.prediction = prediction
        self.train_text_encoder = train_text_encoder
        self.token_vectors = token_vectors
        self.controlnet = controlnet
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)

    def encode_text(self, input_ids, slots=None):
        """`[B, 77]` ids -> `[B, 77, C]` context; `slots` >= 0 take `token_vectors` rows."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if slots is None:
                return self.text_encoder(input_ids)                # [B, 77] -> [B, 77, C]
            embeds = self.text_encoder.token_embedding(input_ids)  # [B, 77, C], frozen
            vectors = self.token_vectors[slots.clamp(min=0)]       # [B, 77] -> [B, 77, C]
            placed = torch.where((slots >= 0)[..., None], vectors.to(embeds.dtype), embeds)
            return self.text_encoder(inputs_embeds=placed)

    def forward(self, latents, input_ids, noise, timesteps, weights=None, slots=None,
                hints=None):
        context = self.encode_text(input_ids, slots)
        a = self.alphas_cumprod[timesteps]                          # [B]
        x_t, t = noisy_latents(latents, noise, a), timesteps.float()
        control = None if self.controlnet is None else self.controlnet(x_t, hints, t, context)
        pred = self.unet(x_t, t, context, control=control)
        target = diffusion_target(latents, noise, a, self.prediction)
        if self.min_snr_gamma is not None:
            snr_weights = min_snr_weight(a.float(), self.min_snr_gamma, self.prediction)
            weights = snr_weights if weights is None else weights * snr_weights
        if self.debiased_estimation:
            debiased = debiased_weight(a.float(), self.prediction)
            weights = debiased if weights is None else weights * debiased
        if weights is None:
            return F.mse_loss(pred.float(), target.float())
        per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)   # [B]
        return (per_image * weights).mean()


def min_snr_weight(alphas_cumprod, gamma, prediction="eps"):
    """Min-SNR-gamma loss weights `[B]` for timesteps with `alphas_cumprod` `[B]` (module
    docstring)."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def debiased_weight(alphas_cumprod, prediction="eps"):
    """Debiased-estimation loss weights `[B]` for timesteps with `alphas_cumprod` `[B]`
    (module docstring)."""
    snr = (alphas_cumprod / (1 - alphas_cumprod)).clamp(max=1000.0)
    return snr.rsqrt() if prediction == "eps" else 1 / (snr + 1)


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed per image: `[B, C, h, w]` -> `[B]`."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAEObjective(nn.Module):
    """`forward(images, eps)` -> reconstruction + KL loss of the autoencoder (module docstring).

    `eps` `[B, E, h, w]` is the standard normal draw of the posterior sample, passed in so the
    module itself holds no random state."""

    def __init__(self, vae, loss="l1", kl_weight=1e-6, foreground_weight=0.0, edge_weight=0.0):
        super().__init__()
        if loss not in VAE_LOSSES:
            raise ValueError(f"vae loss must be one of {', '.join(VAE_LOSSES)}, got {loss!r}")
        self.vae = vae
        self.loss = loss
        self.kl_weight = kl_weight
        self.foreground_weight = foreground_weight
        self.edge_weight = edge_weight

    def forward(self, images, eps):
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * eps
        rec = self.vae.decode(z).float()                           # [B, 3, H, W]
        err = (rec - images.float()).abs() if self.loss == "l1" else (rec - images.float()) ** 2
        if self.foreground_weight or self.edge_weight:
            err = err * pixel_weights(images.float(), self.foreground_weight, self.edge_weight)
        per_image = err.flatten(1).sum(1)
        kl = gaussian_kl(posterior.mean.float(), posterior.logvar.float())
        return ((per_image + self.kl_weight * kl) / images[0].numel()).mean()


def foreground_mask(images):
    """`[B, 1, H, W]` 1.0 where a pixel differs from its image's border colour by more than
    `FOREGROUND_THRESHOLD` in some channel, else 0.0 (`images` `[B, 3, H, W]` in [-1, 1])."""
    ring = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0],
                      images[:, :, 1:-1, -1]], dim=2)                  # [B, 3, perimeter]
    border = ring.median(dim=2).values[:, :, None, None]              # [B, 3, 1, 1]
    return ((images - border).abs().amax(1, keepdim=True) > FOREGROUND_THRESHOLD).float()


def pixel_weights(images, foreground_weight, edge_weight):
    """`[B, 1, H, W]` loss weights: 1, plus `foreground_weight` on the foreground, plus
    `edge_weight` on its outline (dilated minus eroded mask, 3x3)."""
    fg = foreground_mask(images)
    outline = F.max_pool2d(fg, 3, 1, 1) + F.max_pool2d(-fg, 3, 1, 1)    # dilated - eroded
    return 1 + foreground_weight * fg + edge_weight * outline


def foreground_crops(images, size, generator):
    """`[B, 3, size, size]` windows of `images` `[B, 3, H, W]`, each centred on its image's
    foreground (the centroid of `foreground_mask`; the image centre when there is none) moved by
    a uniform offset of up to `size // 4` on each axis (drawn from `generator`), kept inside
    the image."""
    b, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop of {size} px from {h}x{w} images")
    mask = foreground_mask(images)[:, 0]                                  # [B, H, W]
    jitter = torch.randint(-(size // 4), size // 4 + 1, (b, 2), generator=generator)
    crops = []
    for i in range(b):
        ys, xs = torch.nonzero(mask[i], as_tuple=True)
        cy, cx = (ys.float().mean(), xs.float().mean()) if len(ys) else (h / 2, w / 2)
        top = min(max(int(cy - size / 2) + int(jitter[i, 0]), 0), h - size)
        left = min(max(int(cx - size / 2) + int(jitter[i, 1]), 0), w - size)
        crops.append(images[i, :, top:top + size, left:left + size])
    return torch.stack(crops)


def latent_shape(vae_config, batch, height, width):
    """Shape of the latents of `batch` images of `height x width` pixels."""
    factor = 2 ** (len(vae_config.ch_mult) - 1)
    return (batch, vae_config.embed_dim, height // factor, width // factor)


__all__ = ["VAE_SCALE", "VAE_LOSSES", "noisy_latents", "diffusion_target", "DiffusionObjective",
           "gaussian_kl", "VAEObjective", "latent_shape", "min_snr_weight", "foreground_mask",
           "pixel_weights", "foreground_crops",
           "FOREGROUND_THRESHOLD"]
