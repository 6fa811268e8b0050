"""Wrappers around the denoiser: dtype boundary, inpainting channels, CFG, inpaint blending.

Samplers work in float32; only the UNet call runs in the model's dtype.
"""
import torch


class UNetCall:
    """Calls the UNet in its own dtype and returns float32. For 9-channel inpainting models,
    `concat` (`[B, 5, h, w]`: mask, masked-image latent) is appended to the input channels.
    `controls` (`sdfast.addons.controlnet.ActiveControl`s) add ControlNet residuals.
    `cache`: a `StepCache` that runs the UNet instead (step caching), or None."""

    def __init__(self, unet, dtype, concat=None, controls=(), cache=None):
        self.unet = unet
        self.dtype = dtype
        self.concat = concat
        self.controls = list(controls)
        self.cache = cache

    def __call__(self, x, timesteps, context, cond_rows=None, **kwargs):
        x = x.to(self.dtype)
        context = context.to(self.dtype)
        control = None
        for active in self.controls:
            residuals = active.residuals(x, timesteps, context, cond_rows)
            if residuals is not None:
                control = residuals if control is None else [a + b for a, b in zip(control, residuals)]
        if self.concat is not None:
            repeat = x.shape[0] // self.concat.shape[0]              # CFG doubles the batch
            x = torch.cat([x, self.concat.repeat(repeat, 1, 1, 1).to(x.dtype)], dim=1)
        if control is not None:
            kwargs["control"] = control
        if self.cache is not None:
            return self.cache(self.unet, x, timesteps, context, **kwargs).float()
        out = self.unet(x, timesteps, context=context, **kwargs)
        return out.float()


class StepCache:
    """Step caching as in DeepCache (Ma et al. (2023), "DeepCache: Accelerating Diffusion Models
    for Free"): the UNet's deep features change slowly from step to step, so every
    `interval`-th UNet call runs the whole UNet and keeps the feature entering
    `output_blocks[-depth]`, and the calls between run only the shallow branch
    (`input_blocks[:depth]`, `output_blocks[-depth:]`) on the kept feature
    (`UNetModel.forward_with_cache`). Calls are counted, not sampler steps: second-order
    samplers (heun, dpm_2, ...) call the model twice per step. One StepCache serves one
    sampling run; `full` and `shallow` count the calls of each kind."""

    def __init__(self, interval, depth):
        self.interval = interval
        self.depth = depth
        self.full = 0
        self.shallow = 0
        self._deep = None

    def __call__(self, unet, x, timesteps, context, **kwargs):
        if (self.full + self.shallow) % self.interval == 0:
            out, self._deep = unet.forward_with_cache(x, timesteps, context, depth=self.depth,
                                                      **kwargs)
            self.full += 1
        else:
            out, _ = unet.forward_with_cache(x, timesteps, context, depth=self.depth,
                                             deep=self._deep, **kwargs)
            self.shallow += 1
        return out


class CFGDenoiser:
    """Classifier-free guidance on the denoised prediction: `u + cfg * (c - u)`.
    cond and uncond run as one batch; the unconditional pass is skipped when cfg == 1. The
    inner call gets `cond_rows`: how many leading rows are conditional (ControlNet modes)."""

    def __init__(self, denoiser, cond, uncond, cfg):
        self.inner = denoiser
        self.cond = cond
        self.uncond = uncond
        self.cfg = cfg
        self.model_sampling = denoiser.model_sampling

    def __call__(self, x, sigma, seed=None, **kwargs):
        if self.cfg == 1.0:
            return self.inner(x, sigma, context=self.cond, cond_rows=x.shape[0], **kwargs)
        x_in = torch.cat([x, x])                                     # [2B, C, h, w]
        sigma_in = torch.cat([sigma, sigma])
        context = torch.cat([self.cond, self.uncond])                # [2B, L, D]
        cond, uncond = self.inner(x_in, sigma_in, context=context, cond_rows=x.shape[0],
                                  **kwargs).chunk(2)
        return uncond + (cond - uncond) * self.cfg


class InpaintBlend:
    """Inpainting with an ordinary model (ComfyUI's approach): before each model call the known
    region (mask 0) is replaced by the init latent noised to the current sigma, and after it
    the prediction there is replaced by the init latent itself."""

    def __init__(self, denoiser, latent, noise, mask):
        self.inner = denoiser
        self.latent = latent
        self.noise = noise
        self.mask = mask                       # [B, 4, h, w]: 1 = repaint, 0 = keep
        self.model_sampling = denoiser.model_sampling

    def __call__(self, x, sigma, **kwargs):
        keep = 1.0 - self.mask
        noised = self.latent + self.noise * sigma.reshape(-1, 1, 1, 1)
        x = x * self.mask + noised * keep
        out = self.inner(x, sigma, **kwargs)
        return out * self.mask + self.latent * keep
