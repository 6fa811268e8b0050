"""txt2img / img2img / inpainting: wires text encoder, sampler, UNet and VAE. Owns no math.

Seeds follow ComfyUI: the initial noise is `torch.randn([B, 4, H/8, W/8])` from a CPU
generator seeded with `seed`, in float32, then moved to the device; ancestral and SDE samplers
draw their per-step noise from CPU generators seeded from the same seed. A seed therefore
gives the same image on any device.
"""
import torch
from tqdm.auto import tqdm

from . import sampling, text
from .errors import SdfastError
from .guidance import CFGDenoiser, InpaintBlend, UNetCall
from .images import prepare_image, prepare_mask, to_output

OUTPUTS = ("pil", "latent", "tensor")
VAE_SCALE = 0.18215     # SD1.x / SD2.x latent scale factor


class Pipeline:
    """A loaded Stable Diffusion model. Build one with `sdfast.load(path)`."""

    def __init__(self, unet, vae, text_encoder, info, device, dtype, source=None, metadata=None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.metadata = dict(metadata or {})
        self.model_sampling = sampling.ModelSampling(prediction=info.prediction).to(self.device)
        self.tokenizer = text.get_tokenizer(pad_id=0 if info.family == "sd2" else None)
        self._info = info
        self._model_hash = None

    # ----------------------------------------------------------------------------- facts
    @property
    def info(self):
        """`family`, `prediction`, `inpaint` and parameter counts of each component."""
        counts = {name: sum(p.numel() for p in module.parameters())
                  for name, module in (("unet", self.unet), ("vae", self.vae),
                                       ("text_encoder", self.text_encoder))}
        return {**self._info.as_dict(), "parameters": counts, "source": self.source}

    @property
    def model_hash(self):
        """A1111's model hash: the first 10 hex digits of the file's SHA-256 (or None)."""
        if self._model_hash is None and self.source:
            from .io.png import file_hash
            self._model_hash = file_hash(self.source)
        return self._model_hash

    # ----------------------------------------------------------------------------- text
    def _encode_ids(self, clip_skip):
        def encode(ids):                                   # [n, 77] -> [n, 77, C]
            return self.text_encoder(ids.to(self.device), clip_skip=clip_skip)
        return encode

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt="", clip_skip=1, weighting="a1111"):
        """`(cond, uncond)`, each `[1, 77 * chunks, C]`, padded to the same number of chunks."""
        _check_choice("weighting", weighting, text.WEIGHTINGS)
        if not isinstance(clip_skip, int) or clip_skip < 1:
            raise SdfastError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
        return text.encode_prompt(self._encode_ids(clip_skip), self.tokenizer, prompt,
                                  negative_prompt, weighting=weighting)

    # ----------------------------------------------------------------------------- images
    @torch.no_grad()
    def encode_image(self, image):
        """Image `[B, 3, H, W]` in [-1, 1] -> scaled latents (the VAE posterior mean)."""
        mean = self.vae.encode(image.to(self.device, self.dtype)).mean
        return mean * VAE_SCALE

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled latents -> images `[B, 3, H, W]` in [0, 1]."""
        image = self.vae.decode(latents.to(self.dtype) / VAE_SCALE)
        return ((image.float() + 1) / 2).clamp(0, 1)

    # ----------------------------------------------------------------------------- sampling
    def _sigmas(self, scheduler, steps, strength):
        if strength >= 1.0:
            return sampling.get_sigmas(scheduler, self.model_sampling, steps)
        # ComfyUI's denoise: a longer schedule, of which the last `steps` steps are run.
        total = int(steps / strength)
        return sampling.get_sigmas(scheduler, self.model_sampling, total)[-(steps + 1):]

    def _noise(self, noise, seed, shape):
        if noise is None:
            seeds = seed if isinstance(seed, (list, tuple)) else [seed]
            rows = (shape[0] // len(seeds), *shape[1:])
            noise = torch.cat([torch.randn(rows, dtype=torch.float32,
                                           generator=torch.Generator("cpu").manual_seed(int(s)))
                               for s in seeds])                              # [B, 4, h, w]
        elif tuple(noise.shape) != tuple(shape):
            raise SdfastError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
        return noise.to(self.device, torch.float32)

    @property
    def native_size(self):
        """`(width, height)` the model was trained at, the default of `generate`: the file's
        `sdfast.resolution` or ModelSpec `modelspec.resolution` metadata, else 768 for SD2
        v-prediction models and 512 for the rest (as A1111 and ComfyUI default)."""
        return native_size(self.metadata, self._info)

    @torch.no_grad()
    def generate(self, prompt, negative_prompt="", *, width=None, height=None, steps=20, cfg=7.0,
                 sampler="euler", scheduler="normal", seed=0, batch_size=1, init_image=None,
                 strength=0.75, mask=None, clip_skip=1, weighting="a1111", noise=None,
                 output="pil", progress=True):
        """Generate images. Returns a list of PIL images (`output="pil"`), the final latents
        before the VAE scale is undone (`"latent"`), or `[B, 3, H, W]` in 0..1 (`"tensor"`).

        `prompt` (and `negative_prompt`) may also be a list: one image per prompt. `seed` may be
        a list with one seed per image: image i then gets exactly the noise that a batch of one
        with seed[i] gets (A1111-style per-image seeds); one int seeds the whole batch's noise
        as ComfyUI does. `width`/`height` default to `native_size`.
        """
        if init_image is None:
            strength = 1.0
        width = self.native_size[0] if width is None else width
        height = self.native_size[1] if height is None else height
        batch_size = _batch_size(prompt, seed, batch_size)
        sample_fn = check_request(width, height, steps, sampler, scheduler, batch_size,
                                   strength, output, mask, init_image)
        shape = (batch_size, 4, height // 8, width // 8)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, clip_skip, weighting)
        noise = self._noise(noise, seed, shape)
        sigmas = self._sigmas(scheduler, steps, strength).to(self.device)

        init_latent = None
        if init_image is not None:
            image = prepare_image(init_image, width, height)          # [1, 3, H, W] in [-1, 1]
            init_latent = self.encode_image(image).float().expand(shape)
        pixel_mask = None if mask is None else prepare_mask(mask, width, height).to(self.device)

        concat = None
        if self._info.inpaint:
            concat = self._inpaint_channels(init_image, pixel_mask, shape)
        denoiser = CFGDenoiser(
            sampling.make_denoiser(UNetCall(self.unet, self.dtype, concat), self.model_sampling),
            cond.to(self.device).float().expand(batch_size, -1, -1),
            uncond.to(self.device).float().expand(batch_size, -1, -1), float(cfg))
        if pixel_mask is not None and not self._info.inpaint:
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=shape[2:],
                                                          mode="bilinear")
            denoiser = InpaintBlend(denoiser, init_latent, noise, latent_mask.expand(shape))

        x = noise * sigmas[0]
        if init_latent is not None and strength < 1.0:
            x = x + init_latent
        x = self._run(sample_fn, denoiser, x, sigmas, seed, progress)
        if output == "latent":
            return x
        return to_output(self.decode_latents(x), output)

    def _inpaint_channels(self, init_image, pixel_mask, shape):
        """The 5 extra input channels of a 9-channel inpainting model: the latent-size mask and
        the latent of the image with the repainted region blanked (diffusers' and LDM's order).
        Without a mask everything is repainted; without an image the blank image is used."""
        height, width = shape[2] * 8, shape[3] * 8
        if pixel_mask is None:
            pixel_mask = torch.ones(1, 1, height, width, device=self.device)
        if init_image is None:
            image = torch.zeros(1, 3, height, width, device=self.device)
        else:
            image = prepare_image(init_image, width, height).to(self.device)
        masked = self.encode_image(image * (pixel_mask < 0.5)).float()     # [1, 4, h, w]
        latent_mask = torch.nn.functional.interpolate(pixel_mask, size=shape[2:],
                                                      mode="bilinear")
        return torch.cat([latent_mask, masked], dim=1).expand(shape[0], -1, -1, -1)

    def _run(self, sample_fn, denoiser, x, sigmas, seed, progress):
        bar = tqdm(total=len(sigmas) - 1, disable=not progress, leave=False, unit="step")

        def callback(state):
            bar.update(1)

        try:
            seeds = [int(s) for s in seed] if isinstance(seed, (list, tuple)) else int(seed)
            return sample_fn(denoiser, x, sigmas, extra_args={"seed": seeds}, callback=callback)
        finally:
            bar.close()


def _batch_size(prompt, seed, batch_size):
    """The batch size implied by list prompts / per-image seeds, checked against `batch_size`."""
    sizes = {batch_size} if batch_size != 1 else set()
    if not isinstance(prompt, str):
        sizes.add(len(prompt))
    if isinstance(seed, (list, tuple)):
        sizes.add(len(seed))
    if len(sizes) > 1:
        raise SdfastError(f"batch size, prompt list and seed list disagree: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _check_choice(what, value, valid):
    if value not in valid:
        raise SdfastError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


RESOLUTION_KEY = "sdfast.resolution"     # "64" or "640x512", written by sdfast's trainers
MODELSPEC_RESOLUTION_KEY = "modelspec.resolution"


def native_size(metadata, info):
    """`(width, height)` for a model (see `Pipeline.native_size`)."""
    for key in (RESOLUTION_KEY, MODELSPEC_RESOLUTION_KEY):
        text = str(metadata.get(key, "")).strip()
        if text:
            try:
                parts = [int(part) for part in text.lower().split("x")]
            except ValueError:
                continue
            if len(parts) in (1, 2) and all(p >= 8 and p % 8 == 0 for p in parts):
                return parts[0], parts[-1]
    from .builtin import MODEL_NAME, RESOLUTION

    if metadata.get("sdfast.model") == MODEL_NAME:          # the first shipped version lacks the key
        return RESOLUTION, RESOLUTION
    side = 768 if info.family == "sd2" and info.prediction == "v" else 512
    return side, side


def check_request(width, height, steps, sampler, scheduler, batch_size, strength, output="pil",
                  mask=None, init_image=None):
    """Every argument check of `generate`, before any work is done. Returns the sampler."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 8 or value % 8:
            raise SdfastError(f"{name} must be a positive multiple of 8, got {value!r}")
    if not isinstance(steps, int) or steps < 1:
        raise SdfastError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SdfastError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 < strength <= 1.0:
        raise SdfastError(f"strength must be in (0, 1], got {strength!r}")
    _check_choice("output", output, OUTPUTS)
    if mask is not None and init_image is None:
        raise SdfastError("a mask needs an init_image (the picture to inpaint)")
    try:
        sampling.get_sigmas(scheduler, sampling.ModelSampling(), 1)
        return sampling.get_sampler(sampler)
    except ValueError as exc:
        raise SdfastError(str(exc)) from None
