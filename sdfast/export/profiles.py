"""TensorRT optimisation profiles: the shapes each engine is built for, and the check that a
request fits them (pure Python: computed and checked without TensorRT).

From image sizes `min`/`opt`/`max` (WxH), a batch range `MIN:OPT:MAX` (images per call) and
`max_chunks` (prompt length in 77-token chunks):

    unet, controlnet  batch MIN .. 2*OPT .. 2*MAX (CFG runs cond and uncond as one batch; MIN
                      itself for cfg 1), latents W/8 x H/8, context 77 .. 77 .. 77*max_chunks,
                      ControlNet residuals at each level's size (ceil halving)
    text_encoder      rows 1 .. 1+2*OPT .. 1+2*MAX*max_chunks (every distinct chunk of the
                      prompts, the negatives and the empty chunk in one batch), 77 tokens
    vae_decoder       batch MIN .. OPT .. MAX at the latent sizes
    vae_encoder       batch 1 .. 1 .. MAX at the image sizes (img2img encodes one image)

Static inputs (the clip skip scalar) need no profile.
"""
from dataclasses import dataclass

from ..errors import SdfastError
from .graphs import _down

TOKENS = 77


@dataclass(frozen=True)
class BuildShapes:
    """What the engines must accept: image sizes (width, height) and batch (min, opt, max)."""

    min_size: tuple
    opt_size: tuple
    max_size: tuple
    batch: tuple = (1, 1, 4)
    max_chunks: int = 3

    def __post_init__(self):
        for name, (w, h) in (("min", self.min_size), ("opt", self.opt_size), ("max", self.max_size)):
            if w < 8 or h < 8 or w % 8 or h % 8:
                raise SdfastError(f"--{name} {w}x{h}: width and height must be positive multiples of 8")
        for axis, label in ((0, "width"), (1, "height")):
            if not self.min_size[axis] <= self.opt_size[axis] <= self.max_size[axis]:
                raise SdfastError(f"the {label}s must satisfy min <= opt <= max, got "
                                  f"{self.min_size[axis]}, {self.opt_size[axis]}, {self.max_size[axis]}")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise SdfastError(f"--batch {lo}:{opt}:{hi}: need 1 <= MIN <= OPT <= MAX")
        if self.max_chunks < 1:
            raise SdfastError(f"--max-chunks must be >= 1, got {self.max_chunks}")

    def describe(self):
        (w0, h0), (w1, h1) = self.min_size, self.max_size
        return (f"images {w0}x{h0} to {w1}x{h1}, batch {self.batch[0]} to {self.batch[2]}, "
                f"prompts up to {self.max_chunks} chunks of 75 tokens")


def parse_size(text):
    """'512x768' -> (512, 768); a single number is a square."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SdfastError(f"expected WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    if len(values) not in (1, 2):
        raise SdfastError(f"expected WIDTHxHEIGHT (e.g. 512x512), got {text!r}")
    return values[0], values[-1]


def parse_batch(text):
    """'1:2:4' -> (1, 2, 4); 'N' -> (1, N, N)."""
    try:
        values = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise SdfastError(f"expected --batch MIN:OPT:MAX (e.g. 1:1:4), got {text!r}") from None
    if len(values) == 1:
        return 1, values[0], values[0]
    if len(values) != 3:
        raise SdfastError(f"expected --batch MIN:OPT:MAX (e.g. 1:1:4), got {text!r}")
    return tuple(values)


def default_shapes(native_size, batch=(1, 1, 4), max_chunks=3):
    """Half, one and one and a half times the model's native size (multiples of 8)."""
    def scaled(factor):
        return tuple(max(8, int(side * factor) // 8 * 8) for side in native_size)

    return BuildShapes(scaled(0.5), scaled(1.0), scaled(1.5), batch, max_chunks)


def _three(fn):
    """`(min, opt, max)` shapes from `fn(index)` with index 0, 1, 2."""
    return tuple(tuple(fn(i)) for i in range(3))


def compute_profiles(manifest, shapes):
    """`{stage: {input: (min shape, opt shape, max shape)}}` for every engine of an ONNX
    export's manifest (stages "unet", "text_encoder", "vae_decoder", "vae_encoder",
    "controlnet/<name>")."""
    sizes = (shapes.min_size, shapes.opt_size, shapes.max_size)
    lo, opt, hi = shapes.batch
    guided = (lo, 2 * opt, 2 * hi)
    chunks = (1, 1, shapes.max_chunks)
    lat = [(h // 8, w // 8) for w, h in sizes]
    graphs = manifest["graphs"]

    def width(stage, name):
        return graphs[stage]["inputs"][name]["shape"][-1]

    def denoiser(spec, with_hint):
        inputs = spec["inputs"]
        channels = inputs["sample"]["shape"][1]
        context = inputs["context"]["shape"][-1]
        out = {"sample": _three(lambda i: (guided[i], channels, *lat[i])),
               "timestep": _three(lambda i: (guided[i],)),
               "context": _three(lambda i: (guided[i], TOKENS * chunks[i], context))}
        if with_hint:
            hint = inputs["hint"]["shape"][1]
            out["hint"] = _three(lambda i: (guided[i], hint, sizes[i][1], sizes[i][0]))
        for index, (c, d) in enumerate(manifest.get("residuals", [])):
            if f"control_{index}" in inputs:
                out[f"control_{index}"] = _three(
                    lambda i: (guided[i], c, _down(lat[i][0], d), _down(lat[i][1], d)))
        return out

    rows = (1, 1 + 2 * opt, 1 + 2 * hi * shapes.max_chunks)
    text_width = width("text_encoder", "inputs_embeds")
    latent_channels = graphs["vae_decoder"]["inputs"]["latent"]["shape"][1]
    image_channels = graphs["vae_encoder"]["inputs"]["image"]["shape"][1]
    profiles = {
        "text_encoder": {"input_ids": _three(lambda i: (rows[i], TOKENS)),
                         "inputs_embeds": _three(lambda i: (rows[i], TOKENS, text_width)),
                         "embeds_mask": _three(lambda i: (rows[i], TOKENS))},
        "unet": denoiser(graphs["unet"], False),
        "vae_decoder": {"latent": _three(lambda i: ((lo, opt, hi)[i], latent_channels, *lat[i]))},
        "vae_encoder": {"image": _three(lambda i: ((1, 1, hi)[i], image_channels,
                                                   sizes[i][1], sizes[i][0]))},
    }
    for name, spec in manifest.get("controlnets", {}).items():
        profiles[f"controlnet/{name}"] = denoiser(spec, True)
    return profiles


def check_shapes(profile, shapes, engine, built=None):
    """Raise a one-line SdfastError when an input shape lies outside the engine's profile.
    `profile`: {input: (min, opt, max)}; `shapes`: {input: shape}; `built`: `BuildShapes` (or
    its `describe()` text) for the message."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            what = built.describe() if isinstance(built, BuildShapes) else built
            span = " x ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in zip(lo, hi))
            raise SdfastError(f"{engine}: input {name} of shape {list(shape)} is outside the "
                              f"engine's profile [{span}]" + (f" (built for {what})" if what else "")
                              + "; build engines for it (sdfast export tensorrt --min/--max/"
                              "--batch/--max-chunks)")


class ProfileChecked:
    """A runner that checks every request against an engine's profile before running it."""

    def __init__(self, runner, profile, engine, built=None):
        self.runner = runner
        self.profile = profile
        self.engine = self.path = engine
        self.built = built

    def run(self, feeds):
        check_shapes(self.profile, {n: tuple(v.shape) for n, v in feeds.items()}, self.engine,
                     self.built)
        return self.runner.run(feeds)

    def set_weights(self, changes):
        self.runner.set_weights(changes)


__all__ = ["BuildShapes", "parse_size", "parse_batch", "default_shapes", "compute_profiles",
           "check_shapes", "ProfileChecked", "TOKENS"]
