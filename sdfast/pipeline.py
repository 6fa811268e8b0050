"""txt2img / img2img / inpainting: wires text encoder, sampler, UNet and VAE. Owns no math.

Seeds follow ComfyUI: the initial noise is `torch.randn([B, 4, H/8, W/8])` from a CPU
generator seeded with `seed`, in float32, then moved to the device; ancestral and SDE samplers
draw their per-step noise from CPU generators seeded from the same seed. A seed therefore
gives the same image on any device. Seed -1 draws a random seed (A1111), recorded in
`Pipeline.last_seed`.
"""
import math
import operator
import random

import torch
from tqdm.auto import tqdm

from . import sampling, text
from .errors import SdfastError
from .guidance import CFGDenoiser, InpaintBlend, UNetCall
from .images import prepare_image, prepare_mask, to_output

OUTPUTS = ("pil", "latent", "tensor")
VAE_SCALE = 0.18215     # SD1.x / SD2.x latent scale factor
# Step caching's shallow branch: conv_in and the first res block (+ transformer) of the top
# level, and their two output blocks (see bench/step_cache.py for the measurements behind it).
DEFAULT_CACHE_DEPTH = 2
MAX_SIZE = 16384        # width / height cap: larger images cannot be allocated anyway
MAX_STEPS = 10000       # ComfyUI's cap on sampling steps
MAX_BATCH = 64          # images sampled at once (their activations live together)
# img2img runs the last `steps` steps of a `steps / strength` schedule (ComfyUI's denoise): a
# strength below this would make the schedule more than 1000x longer than the steps run.
MIN_STRENGTH = 0.001
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1      # what torch.Generator.manual_seed takes
RANDOM_SEED = -1                                # A1111: -1 draws a random seed


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
        self.lora_dir = None            # where `<lora:name>` prompt tags are looked up
        self._lora_stack = None
        self._lora_files = {}           # path -> (mtime, size, parsed LoraFile): tag cache
        self.embeddings_dir = None      # textual-inversion files loaded when a prompt names them
        self._embeddings = {}           # name -> sdfast.addons.embeddings.Embedding
        self._dir_embeddings = {}       # path -> Embedding read from embeddings_dir
        # Between the phases of `generate`, give back the resident pages of file-mapped CPU
        # weights the next phase does not read (sdfast.io.pages): the text encoder and VAE
        # while the UNet samples, the UNet while the VAE decodes. They map in again from the
        # page cache when next used (about a second for all of SD1.5's weights).
        self.release_weights = True
        self._lora_in_place = False
        self._graphed = None            # sdfast.cuda_graphs.GraphedUNet once enabled
        self.last_seed = None           # the seed(s) the last `generate` used (-1 resolved)

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
        def encode(ids, fixes=None):                       # [n, 77] -> [n, 77, C]
            ids = ids.to(self.device)
            if not fixes or not any(fixes):
                return self.text_encoder(ids, clip_skip=clip_skip)
            embeds = self.text_encoder.token_embedding(ids)                  # [n, 77, C]
            embeds = embeds.clone()
            for row, placements in enumerate(fixes):
                for offset, vector in placements:    # offset counts from the first content token
                    embeds[row, 1 + offset:1 + offset + vector.shape[0]] = vector.to(embeds)
            return self.text_encoder(inputs_embeds=embeds, clip_skip=clip_skip)
        return encode

    # ----------------------------------------------------------------------------- embeddings
    @property
    def embeddings(self):
        """Loaded textual-inversion embeddings: `{name: {"path", "vectors", "width"}}`."""
        return {name: {"path": e.path, "vectors": e.vectors.shape[0], "width": e.vectors.shape[1]}
                for name, e in self._embeddings.items()}

    def _text_width(self):
        return self.text_encoder.token_embedding.weight.shape[1]

    def _check_width(self, embedding):
        width = self._text_width()
        if embedding.vectors.shape[1] != width:
            raise SdfastError(f"{embedding.path}: the embedding is {embedding.vectors.shape[1]} "
                              f"wide but this model's text encoder is {width} wide "
                              "(an SD1.x embedding is 768 wide, SD2.x 1024)")

    def load_embedding(self, path, token=None):
        """Load a textual-inversion embedding (A1111 .pt / .safetensors, diffusers
        learned_embeds, SD1 or SD2, any number of vectors). It is triggered by `token` (default:
        the file name without extension, as in A1111), by a diffusers file's own token, and by
        `embedding:name` in ComfyUI syntax. Returns the name."""
        from .addons.embeddings import read_embedding

        embedding = read_embedding(path, token)
        self._check_width(embedding)
        self._embeddings[embedding.name] = embedding
        return embedding.name

    def unload_embedding(self, name):
        if name not in self._embeddings:
            raise SdfastError(f"no embedding named {name!r} is loaded")
        del self._embeddings[name]

    def _embedding_lookup(self, texts):
        """The lookup for these prompt texts: loaded embeddings, plus files of
        `embeddings_dir` whose names occur in the texts (read once, then cached)."""
        import os

        from .addons.embeddings import EMBEDDING_EXTS, EmbeddingLookup, read_embedding

        found = dict(self._embeddings)
        folder = self.embeddings_dir
        if folder is not None:
            if not os.path.isdir(folder):
                raise SdfastError(f"{folder}: no such embeddings folder")
            joined = "\n".join(texts)
            for root, _, files in os.walk(folder):
                for file in sorted(files):
                    stem, ext = os.path.splitext(file)
                    if ext.lower() not in EMBEDDING_EXTS or stem in found or stem not in joined:
                        continue
                    path = os.path.join(root, file)
                    if path not in self._dir_embeddings:
                        embedding = read_embedding(path)
                        self._check_width(embedding)
                        self._dir_embeddings[path] = embedding
                    found[stem] = self._dir_embeddings[path]
        if not found and folder is None:
            return None       # no embeddings in use: "embedding:x" is text, as in ComfyUI
        return EmbeddingLookup(self.tokenizer, list(found.values()))

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt="", clip_skip=1, weighting="a1111"):
        """`(cond, uncond)`, each `[1, 77 * chunks, C]`, padded to the same number of chunks."""
        _check_choice("weighting", weighting, text.WEIGHTINGS)
        if not isinstance(clip_skip, int) or clip_skip < 1:
            raise SdfastError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts += [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        return text.encode_prompt(self._encode_ids(clip_skip), self.tokenizer, prompt,
                                  negative_prompt, weighting=weighting,
                                  embeddings=self._embedding_lookup(texts))

    # ----------------------------------------------------------------------------- LoRA
    @property
    def loras(self):
        """The loaded LoRAs: `{name: {"path", "strength", "strength_clip", "modules"}}`."""
        stack = self._lora_stack
        return {} if stack is None else {n: l.describe() for n, l in stack.loaded.items()}

    def _stack(self):
        if self._lora_stack is None:
            from .addons.lora import LoraStack
            self._lora_stack = LoraStack({"unet": self.unet, "text_encoder": self.text_encoder},
                                         in_place=self._lora_in_place)
        return self._lora_stack

    @property
    def lora_in_place(self):
        """Whether LoRA merging rewrites weights in their own storage (every parameter keeps
        its address; `enable_cuda_graphs` turns it on) instead of swapping in copies (the
        default: an fp32 CPU load's mmap then serves as the untouched original)."""
        return self._lora_in_place

    @lora_in_place.setter
    def lora_in_place(self, value):
        self._lora_in_place = bool(value)
        if self._lora_stack is not None:
            self._lora_stack.in_place = self._lora_in_place

    # ----------------------------------------------------------------------------- speed
    def enable_cuda_graphs(self):
        """Run the UNet through CUDA graphs, one captured per input signature (size, batch,
        prompt chunks, step-cache branch: `sdfast.cuda_graphs`). Turns `lora_in_place` on so
        that LoRA loads, strength changes and unloads reach the captured graphs exactly."""
        from .cuda_graphs import GraphedUNet

        if self.device.type != "cuda":
            raise SdfastError(f"CUDA graphs need a CUDA device; this pipeline is on {self.device}")
        self.lora_in_place = True
        if self._graphed is None:
            self._graphed = GraphedUNet(self.unet)

    def disable_cuda_graphs(self):
        """Back to eager UNet calls (the captured graphs are freed)."""
        self._graphed = None

    def compile(self, backend="inductor", fullgraph=True, mode=None, dynamic=False):
        """`torch.compile` the UNet in place (`nn.Module.compile`); sdfast's fused ops are
        torch.library custom ops, so the whole UNet traces as one graph (`fullgraph=True`)."""
        self.unet.compile(backend=backend, fullgraph=fullgraph, mode=mode, dynamic=dynamic)
        return self

    def _read_lora(self, path, strict):
        import os
        import warnings

        from .addons.lora import read_lora

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SdfastError(f"{path}: no such LoRA file")
        stat = os.stat(path)
        cached = self._lora_files.get(path)
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            lora = cached[2]
        else:
            lora = read_lora(path, self.unet, self.text_encoder)
            if not lora.modules:
                raise SdfastError(f"{path}: no LoRA module matches a layer of this model")
            self._lora_files[path] = (stat.st_mtime_ns, stat.st_size, lora)
        if lora.unmatched:
            shown = ", ".join(lora.unmatched[:5])
            message = (f"{path}: {len(lora.unmatched)} LoRA key(s) match no layer of this model "
                       f"(first: {shown})")
            if strict:
                raise SdfastError(message)
            warnings.warn(message, stacklevel=3)
        return lora

    def load_lora(self, path, strength=1.0, strength_clip=None, name=None, strict=False):
        """Merge a LoRA (kohya/A1111, diffusers/PEFT, LoCon, LoHa, LoKr) into the weights.
        `strength` scales the UNet part, `strength_clip` the text encoder's (default: the same).
        Keys that match no layer are a warning, an error with `strict=True`. Returns the name
        (default: the file name without extension)."""
        import os

        from .addons.lora import Loaded

        name = name or os.path.splitext(os.path.basename(os.fspath(path)))[0]
        if name in self.loras:
            raise SdfastError(f"a LoRA named {name!r} is already loaded (unload it, or pass name=)")
        strength, strength_clip = _strengths(strength, strength_clip)
        lora = self._read_lora(path, strict)
        try:
            self._stack().add(Loaded(name, os.fspath(path), strength, strength_clip, lora))
        finally:
            self.release_lora_buffers()
        return name

    def set_lora_strength(self, name, strength, strength_clip=None):
        """Change a loaded LoRA's strengths (exact: recomputed from the original weights)."""
        self._check_loaded(name)
        self._stack().set_strength(name, *_strengths(strength, strength_clip))

    def unload_lora(self, name):
        """Remove a LoRA; weights no other LoRA touches get their original tensors back. Their
        merged copies' memory is kept for the next `load_lora` (a swap then maps no new
        memory) and freed once that load or the next `generate` is under way, or by
        `release_lora_buffers`."""
        self._check_loaded(name)
        self._stack().remove(name)

    def release_lora_buffers(self):
        """Free now the memory that `unload_lora` kept for the next load."""
        if self._lora_stack is not None:
            self._lora_stack.release_spares()

    def _check_loaded(self, name):
        if name not in self.loras:
            loaded = ", ".join(self.loras) or "none"
            raise SdfastError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")

    def _prompt_loras(self, prompt):
        """Strip `<lora:...>` tags from the prompt(s); returns `(prompt, tags)`. All
        prompts of a batch must name the same LoRAs (they share the weights)."""
        from .addons.tags import extract_lora_tags

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        stripped, tag_sets = [], []
        for p in prompts:
            text_, tags = extract_lora_tags(p)
            stripped.append(text_)
            tag_sets.append(tags)
        if any(tags != tag_sets[0] for tags in tag_sets):
            raise SdfastError("every prompt of a batch must carry the same <lora:...> tags "
                              "(the LoRAs are merged into weights the batch shares)")
        prompt = stripped[0] if isinstance(prompt, str) else stripped
        return prompt, tag_sets[0]

    def _apply_tags(self, tags, lora_dir):
        """Merge the tagged LoRAs for one call; returns the names to unload afterwards."""
        from .addons.lora import Loaded
        from .addons.tags import find_lora

        names = []
        try:
            for index, tag in enumerate(tags):
                path = find_lora(tag.name, lora_dir if lora_dir is not None else self.lora_dir)
                name = f"<lora:{tag.name}>#{index}"
                self._stack().add(Loaded(name, path, tag.unet, tag.te, self._read_lora(path, False)))
                names.append(name)
        except BaseException:
            self._unapply_tags(names)
            raise
        return names

    def _unapply_tags(self, names):
        for name in reversed(names):
            self._stack().remove(name)

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
                 output="pil", progress=True, lora_dir=None, control=None, cache_interval=1,
                 cache_depth=None):
        """Generate images. Returns a list of PIL images (`output="pil"`), the final latents
        before the VAE scale is undone (`"latent"`), or `[B, 3, H, W]` in 0..1 (`"tensor"`).

        `prompt` (and `negative_prompt`) may also be a list: one image per prompt. `seed` may be
        a list with one seed per image: image i then gets exactly the noise that a batch of one
        with seed[i] gets (A1111-style per-image seeds); one int seeds the whole batch's noise
        as ComfyUI does. Seed -1 (alone or in the list) draws a random seed, as in A1111; the
        seeds used are in `self.last_seed`. `width`/`height` default to `native_size`.

        `control`: one `sdfast.Control(controlnet, image, strength=1.0, start=0.0, end=1.0)` or
        a list of them (ControlNets from `sdfast.load_controlnet`; their residuals add up).

        `<lora:name:strength>` tags (A1111 syntax, see `sdfast.addons.tags`) load `name` from
        `lora_dir` (default `self.lora_dir`) for this call only; they are removed from the text.

        `cache_interval` N > 1 turns on step caching (DeepCache, `sdfast.guidance.StepCache`):
        every N-th UNet call runs the whole UNet, the calls between only its shallow branch of
        `cache_depth` blocks (default `DEFAULT_CACHE_DEPTH`, at most the number of input blocks).
        Faster, and an approximation; 1 (the default) is off and changes nothing.
        """
        cache = self.step_cache(cache_interval, cache_depth)
        seed = resolve_seeds(seed)
        self.last_seed = list(seed) if isinstance(seed, list) else seed
        prompt, tags = self._prompt_loras(prompt)
        names = self._apply_tags(tags, lora_dir) if tags else []
        self.release_lora_buffers()      # what earlier unloads kept and these tags did not take
        try:
            return self._generate(prompt, negative_prompt, width, height, steps, cfg, sampler,
                                  scheduler, seed, batch_size, init_image, strength, mask,
                                  clip_skip, weighting, noise, output, progress, control, cache)
        finally:
            if names:
                self._unapply_tags(names)

    def _generate(self, prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler,
                  seed, batch_size, init_image, strength, mask, clip_skip, weighting, noise,
                  output, progress, control=None, cache=None):
        if init_image is None:
            strength = 1.0
        width = self.native_size[0] if width is None else width
        height = self.native_size[1] if height is None else height
        batch_size = _batch_size(prompt, seed, batch_size)
        sample_fn = check_request(width, height, steps, sampler, scheduler, batch_size,
                                   strength, output, mask, init_image, cfg=cfg)
        shape = (batch_size, 4, height // 8, width // 8)
        from .addons.controlnet import prepare_controls
        controls = prepare_controls(control, self.unet, width, height, self.device, self.dtype)
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
        unet = self.unet if self._graphed is None else self._graphed
        denoiser = CFGDenoiser(
            sampling.make_denoiser(UNetCall(unet, self.dtype, concat, controls, cache),
                                   self.model_sampling),
            cond.to(self.device).float().expand(batch_size, -1, -1),
            uncond.to(self.device).float().expand(batch_size, -1, -1), float(cfg))
        if pixel_mask is not None and not self._info.inpaint:
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=shape[2:],
                                                          mode="bilinear")
            denoiser = InpaintBlend(denoiser, init_latent, noise, latent_mask.expand(shape))

        x = noise * sigmas[0]
        if init_latent is not None and strength < 1.0:
            x = x + init_latent
        self._release(self.text_encoder, self.vae)
        x = self._run(sample_fn, denoiser, x, sigmas, seed, progress)
        self._release(self.unet)
        _check_finite(x, "sampling")
        if output == "latent":
            return x
        images = self.decode_latents(x)
        self._release(self.vae)
        _check_finite(images, "decoding the latents")
        return to_output(images, output)

    def _release(self, *modules):
        """Give back the resident pages of the modules' file-mapped CPU weights (see
        `release_weights`)."""
        if self.release_weights and self.device.type == "cpu":
            from .io.pages import release_pages

            release_pages(*modules)

    def step_cache(self, interval, depth=None):
        """The `StepCache` that `generate(cache_interval=, cache_depth=)` uses, None when off;
        raises SdfastError for values this model cannot take (checked before any work)."""
        from .guidance import StepCache

        check_cache_interval(interval)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
            raise SdfastError(f"cache_depth must be an integer, got {depth!r}")
        if not hasattr(self.unet, "forward_with_cache"):
            if interval == 1 and depth is None:
                return None
            raise SdfastError("step caching (cache_interval, cache_depth) needs the torch "
                              "backend's UNet")
        blocks = len(self.unet.input_blocks)
        depth = min(DEFAULT_CACHE_DEPTH, blocks) if depth is None else depth
        if not 1 <= depth <= blocks:
            raise SdfastError(f"cache_depth must be in 1..{blocks} (this UNet's input blocks), "
                              f"got {depth}")
        return None if interval == 1 else StepCache(interval, depth)

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


def check_cache_interval(interval):
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise SdfastError(f"cache_interval must be an integer >= 1 (1 = off), got {interval!r}")


def _strengths(strength, strength_clip):
    """`(unet, text encoder)` strengths as floats; the text encoder's defaults to the UNet's."""
    try:
        strength = float(strength)
        strength_clip = strength if strength_clip is None else float(strength_clip)
    except (TypeError, ValueError):
        raise SdfastError(f"LoRA strengths must be numbers, got {strength!r}, {strength_clip!r}") from None
    if not (math.isfinite(strength) and math.isfinite(strength_clip)):
        raise SdfastError(f"LoRA strengths must be finite numbers, got {strength}, {strength_clip}")
    return strength, strength_clip


def check_seed(seed, what="seed"):
    """`seed` as an int within what torch's generators take (-1 included: a random seed)."""
    if isinstance(seed, bool):
        raise SdfastError(f"{what} must be an integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise SdfastError(f"{what} must be an integer, got {seed!r}") from None
    if not SEED_MIN <= value <= SEED_MAX:
        raise SdfastError(f"{what} {value} is out of range: seeds are {SEED_MIN} to {SEED_MAX} "
                          "(-1: a random seed)")
    return value


def random_seed():
    """A fresh random seed below 2**32 (A1111's range), independent of torch's global RNG."""
    return random.SystemRandom().randrange(2 ** 32)


def resolve_seed(seed, what="seed"):
    """A checked seed; -1 becomes a random one (A1111)."""
    value = check_seed(seed, what)
    return random_seed() if value == RANDOM_SEED else value


def resolve_seeds(seed):
    """`resolve_seed` of an int seed, or of each seed of a list/tuple (returns a list)."""
    if isinstance(seed, (list, tuple)):
        return [resolve_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
    return resolve_seed(seed)


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


def _number(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SdfastError(f"{name} must be a number, got {value!r}") from None


def _check_finite(t, stage):
    if not torch.isfinite(t).all():
        raise SdfastError(f"{stage} produced NaN or infinite values (from a LoRA, embedding or "
                          "ControlNet, or a cfg, strength or prompt weight too large)")


def check_request(width, height, steps, sampler, scheduler, batch_size, strength, output="pil",
                  mask=None, init_image=None, cfg=None):
    """Every argument check of `generate`, before any work is done. Returns the sampler."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 8 or value % 8:
            raise SdfastError(f"{name} must be a positive multiple of 8, got {value!r}")
        if value > MAX_SIZE:
            raise SdfastError(f"{name} {value} is too large (at most {MAX_SIZE})")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SdfastError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise SdfastError(f"batch_size must be an integer in 1..{MAX_BATCH} (run several batches "
                          f"for more images), got {batch_size!r}")
    if not MIN_STRENGTH <= _number(strength, "strength") <= 1.0:     # NaN fails too
        raise SdfastError(f"strength must be in [{MIN_STRENGTH:g}, 1] (img2img runs the last "
                          f"steps of a steps/strength schedule), got {strength!r}")
    if cfg is not None and not math.isfinite(_number(cfg, "cfg")):
        raise SdfastError(f"cfg must be a finite number, got {cfg!r}")
    _check_choice("output", output, OUTPUTS)
    if mask is not None and init_image is None:
        raise SdfastError("a mask needs an init_image (the picture to inpaint)")
    try:
        sampling.get_sigmas(scheduler, sampling.ModelSampling(), 1)
        return sampling.get_sampler(sampler)
    except ValueError as exc:
        raise SdfastError(str(exc)) from None
