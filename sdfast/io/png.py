"""PNG output with an A1111-format `parameters` text chunk (read by A1111's PNG Info and Civitai),
and A1111's model hash."""
import hashlib
import os

from PIL import PngImagePlugin

from ..errors import SdfastError, WriteError

# A1111's display names for samplers and schedule types.
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "ddpm": "DDPM", "uni_pc": "UniPC",
    "lcm": "LCM",
}
A1111_SCHEDULES = {
    "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta",
}


def file_hash(path, digits=10):
    """SHA-256 of a file (for a diffusers folder: of its model_index.json), first `digits`."""
    if os.path.isdir(path):
        path = os.path.join(path, "model_index.json")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def _fmt(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def a1111_parameters(prompt, negative_prompt, *, steps, sampler, scheduler, cfg, seed, width,
                     height, model_hash=None, model_name=None, clip_skip=1, strength=None):
    """The `parameters` text A1111 writes: prompt, `Negative prompt: ...`, then one line of
    `Key: value` pairs."""
    fields = [("Steps", steps), ("Sampler", A1111_SAMPLERS.get(sampler, sampler))]
    if scheduler in A1111_SCHEDULES:
        fields.append(("Schedule type", A1111_SCHEDULES[scheduler]))
    fields += [("CFG scale", cfg), ("Seed", seed), ("Size", f"{width}x{height}")]
    if model_hash:
        fields.append(("Model hash", model_hash))
    if model_name:
        fields.append(("Model", model_name))
    if strength is not None:
        fields.append(("Denoising strength", strength))
    if clip_skip and clip_skip > 1:
        fields.append(("Clip skip", clip_skip))
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_fmt(v)}" for k, v in fields))
    return "\n".join(lines)


def save_png(image, path, parameters, overwrite=False):
    """Write `image` with its `parameters` chunk, atomically (`sdfast.io.save.write_atomic`: a
    temporary file in the same folder, renamed when complete; a failed write leaves no partial
    file and any existing file intact). Without `overwrite`, an existing file is never
    replaced, even one that appears while the image is encoded."""
    from .save import write_atomic

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    try:
        write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info),
                     overwrite=overwrite)
    except FileExistsError:
        raise SdfastError(f"{path}: exists (use --overwrite to replace it)") from None
    except OSError as exc:
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from None


def free_paths(path, count, overwrite=False):
    """`count` output paths from `path`: `out.png`, then `out-1.png`, `out-2.png`, ...
    Without `overwrite`, names that exist are skipped (numbered names, A1111-style)."""
    stem, ext = os.path.splitext(path)
    ext = ext or ".png"
    paths, index = [], 0
    while len(paths) < count:
        candidate = f"{stem}{ext}" if index == 0 else f"{stem}-{index}{ext}"
        if overwrite or not os.path.exists(candidate):
            paths.append(candidate)
        index += 1
    return paths
