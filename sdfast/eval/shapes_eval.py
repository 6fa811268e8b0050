"""`sdfast eval shapes`: how well a model follows shapes-dataset prompts it was not trained on.

1. Prompts: `n` specs drawn from a split of the grid (`sdfast.data.shapes`; held-out by default)
   by a seeded shuffle, in successive passes over the split when `n` exceeds it, so the first
   `k` prompts of a run with `n > k` are the prompts of a run with `n = k`. Captions are canonical
   ("a large red circle at the top left on a blue background"); with `variety`, the dataset's
   varied captions from a second seeded stream, which may leave size, position or background out.
2. Images: one per prompt at the built-in model's resolution; prompt i gets seed `seed + i`.
   Prompt i's image depends only on (prompt i, seed + i), never on the batch it is in: a real
   `Pipeline` samples `batch_size` prompts as one batch with per-item seeds (initial noise drawn
   per seed as `generate` draws it for a batch of one; stochastic samplers get one noise
   generator per item, `sdfast.sampling.noise`), which is `pipe.generate(prompt_i,
   seed=seed + i, batch_size=1)` up to float rounding; any other object with a `generate`
   method is called that way, once per prompt.
3. Scores: `sdfast.eval.analyser.analyse` reads each image back and `score` compares it with the
   attributes the prompt names (an attribute a prompt leaves out is not scored).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.shapes import SPLITS, ShapeSpec, all_specs, caption_parts, heldout_specs, train_specs
from ..errors import SdfastError
from ..io.save import publish_atomic, text_writer
from .analyser import ATTRIBUTES, Analysis, analyse, score

LABELS = {"color": "colour", "shape": "shape", "position": "position", "size": "size",
          "background": "background", "all": "all"}
_POOLS = {"heldout": heldout_specs, "train": train_specs, "all": all_specs}
_SPLIT_WORDS = {"heldout": "held-out", "train": "training", "all": "grid"}


# ------------------------------------------------------------------------------------ prompts
def select_prompts(n: int, seed: int = 0, split: str = "heldout",
                   variety: bool = False) -> list[tuple[str, ShapeSpec, ShapeSpec]]:
    """`n` seeded prompts from `split`: a list of `(prompt, spec, expected)`.

    `spec` is the combination drawn; `expected` the partial spec of what the prompt names (equal
    to `spec` for canonical captions). Same arguments, same prompts.
    """
    _check_count("n", n)
    _check_seed(seed)
    _check_split(split)
    pool = _POOLS[split]()
    order_rng = np.random.default_rng(seed)
    caption_rng = np.random.default_rng([seed, 1]) if variety else None
    order: list[int] = []
    while len(order) < n:                                    # whole shuffled passes over the pool
        order.extend(int(k) for k in order_rng.permutation(len(pool)))
    prompts = []
    for k in order[:n]:
        text, expected = caption_parts(pool[k], caption_rng)
        prompts.append((text, pool[k], expected))
    return prompts


MAX_COUNT = 100000   # prompts (or a batch): beyond it an evaluation runs for days
SEED_MAX = 2 ** 63 - 1


def _check_count(name, value, most=MAX_COUNT):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise SdfastError(f"{name} must be an integer in 1..{most}, got {value!r}")


def _check_split(split):
    if split not in SPLITS:
        raise SdfastError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SdfastError(f"seed must be an integer in 0..{SEED_MAX}, got {seed!r}")


# --------------------------------------------------------------------------------- evaluation
def check_settings(n=200, seed=0, steps=20, cfg=5.0, sampler="euler", scheduler="normal",
                   batch_size=16, split="heldout") -> dict:
    """Every argument check of `evaluate`, before any work (the CLI runs it before loading).
    Returns the per-image `generate` settings: width, height, steps, cfg, sampler, scheduler."""
    from ..builtin import RESOLUTION
    from ..pipeline import check_request

    _check_count("n", n)
    _check_seed(seed)
    _check_split(split)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not np.isfinite(cfg):
        raise SdfastError(f"cfg must be a finite number, got {cfg!r}")
    check_request(RESOLUTION, RESOLUTION, steps, sampler, scheduler, batch_size, 1.0)
    return dict(width=RESOLUTION, height=RESOLUTION, steps=steps, cfg=float(cfg),
                sampler=sampler, scheduler=scheduler)


def evaluate(pipe, n=200, seed=0, steps=20, cfg=5.0, sampler="euler", scheduler="normal",
             batch_size=16, split="heldout", variety=False, progress=False, save_images=None,
             overwrite=False, cache_interval=1, cache_depth=None) -> dict:
    """Generate one image per selected prompt with `pipe`, analyse it, score it.

    `cache_interval` / `cache_depth`: step caching, passed to `pipe.generate` (only when
    caching is on, so any object with a `generate` method still works without it).

    `save_images`: a folder to also write the images to (`00000.png`, ... with A1111
    parameters); existing files there are refused before any work unless `overwrite`.
    Returns `{"accuracy": {attribute: fraction or None, ..., "all": ...}, "correct": {...},
    "counts": {attribute: prompts naming it}, "n", "settings", "samples": [row, ...]}`; each row
    holds `index, prompt, seed, spec, expected, analysis, correct` (per attribute: True, False,
    or None when the prompt leaves it out) and `ok` (right on everything named).
    """
    gen = check_settings(n, seed, steps, cfg, sampler, scheduler, batch_size, split)
    cache = _cache_settings(pipe, cache_interval, cache_depth)
    prompts = select_prompts(n, seed, split, variety)
    paths = _image_paths(save_images, n, overwrite)
    settings = dict(sdfast=__version__, model=_source(pipe), split=split, variety=bool(variety), seed=seed,
                    batch_size=batch_size, **gen, cache_interval=cache_interval,
                    cache_depth=cache.get("cache_depth"))
    texts = [text for text, _, _ in prompts]
    images = _generate_all(pipe, texts, seed, dict(gen, **cache), batch_size, progress)
    rows = []
    for index, ((text, spec, expected), image) in enumerate(zip(prompts, images)):
        if paths:
            _save_image(image, paths[index], text, seed + index, gen, overwrite)
        rows.append(_row(index, text, seed + index, spec, expected, analyse(image)))
    return _summary(rows, settings)


class RoundTrip:
    """A stand-in for a pipeline whose "generated" image is the ground truth: the prompt's
    scene drawn by `sdfast.data.shapes.render` (jitter seeded by the image's seed), passed
    through `vae` (encode, posterior mean, decode) when one is given. `evaluate(RoundTrip(vae))`
    is the ceiling any diffusion model decoding through `vae` can reach on these prompts;
    `evaluate(RoundTrip())` is the analyser's own accuracy on the generator's images."""

    source = None

    def __init__(self, vae=None):
        self.vae = vae

    def generate(self, prompt, negative="", *, seed, batch_size=1, output="pil", **_settings):
        import torch
        from PIL import Image

        from ..data.shapes import render
        from .analyser import parse_caption

        image = render(parse_caption(prompt), np.random.default_rng(seed))
        if self.vae is None:
            return [image]
        param = next(self.vae.parameters())
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]   # [1, 3, H, W] uint8
        with torch.no_grad():
            y = self.vae.decode(self.vae.encode(x.to(param) / 127.5 - 1).mean)
        pixels = ((y[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
        return [Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())]    # [H, W, 3] uint8


def _cache_settings(pipe, interval, depth):
    """The step-caching arguments for `pipe.generate`: {} when off, else the interval and the
    depth in force (checked by the pipeline when it has `step_cache`)."""
    from ..pipeline import check_cache_interval

    check_cache_interval(interval)
    if interval == 1 and depth is None:
        return {}
    if hasattr(pipe, "step_cache"):
        cache = pipe.step_cache(interval, depth)
        depth = None if cache is None else cache.depth
    return {"cache_interval": interval, "cache_depth": depth}


def _source(pipe):
    source = getattr(pipe, "source", None)
    return None if source is None else str(source)


def _generate_all(pipe, prompts, seed, gen, batch_size, progress):
    """One PIL image per prompt, prompt i with seed `seed + i`, `batch_size` prompts at a time."""
    from tqdm.auto import tqdm

    together = _can_batch(pipe)
    images = []
    with tqdm(total=len(prompts), disable=not progress, unit="image") as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            seeds = [seed + start + k for k in range(len(chunk))]
            out = _sample_together(pipe, chunk, seeds, gen) if together and len(chunk) > 1 else None
            if out is None:
                out = [_generate_one(pipe, prompt, s, gen) for prompt, s in zip(chunk, seeds)]
            images.extend(out)
            bar.update(len(chunk))
    return images


def _generate_one(pipe, prompt, seed, gen):
    images = pipe.generate(prompt, "", seed=seed, batch_size=1, output="pil", progress=False, **gen)
    if len(images) != 1:
        raise SdfastError(f"generate returned {len(images)} images for a batch of 1")
    return images[0]


def _can_batch(pipe) -> bool:
    """True for a real txt2img `Pipeline` (an inpainting model goes prompt by prompt)."""
    from ..pipeline import Pipeline

    return isinstance(pipe, Pipeline) and not pipe.info["inpaint"]


def _sample_together(pipe, prompts, seeds, gen):
    """`pipe.generate(prompts[i], seed=seeds[i], batch_size=1)` for every i, as one batch: each
    image gets its own conditioning row and its own seed's noise. None when the prompts span
    different numbers of 77-token chunks (padding one to another's length would change its
    image), so those go one by one."""
    from ..text import tokenize_prompt

    if len({len(tokenize_prompt(pipe.tokenizer, p)) for p in prompts}) != 1:
        return None
    return pipe.generate(list(prompts), "", seed=list(seeds), output="pil", progress=False, **gen)


def _row(index, prompt, seed, spec, expected, analysis) -> dict:
    """One sample of the result: what was asked, what was read back, and what matched."""
    one = score([expected], [analysis])                          # the analyser's one definition
    correct = {name: None if one[name] is None else one[name] == 1.0 for name in ATTRIBUTES}
    return {"index": index, "prompt": prompt, "seed": seed, "spec": asdict(spec),
            "expected": asdict(expected), "analysis": asdict(analysis), "correct": correct,
            "ok": one["all"] == 1.0}


def _summary(rows, settings) -> dict:
    """The result: accuracies over all rows (`score` again, on the stored analyses), counts."""
    targets = [ShapeSpec(**row["expected"]) for row in rows]
    found = score(targets, [Analysis(**row["analysis"]) for row in rows])
    correct = {name: sum(row["correct"][name] is True for row in rows) for name in ATTRIBUTES}
    correct["all"] = sum(row["ok"] for row in rows)
    accuracy = {name: found[name] for name in (*ATTRIBUTES, "all")}
    return {"accuracy": accuracy, "correct": correct, "counts": dict(found["counts"]),
            "n": found["n"], "settings": settings, "samples": rows}


# ------------------------------------------------------------------------------------ outputs
def _image_paths(folder, n, overwrite):
    """`folder/00000.png ...`, created up front; None without a folder. Refuses to replace
    files unless `overwrite`, before anything is generated."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SdfastError(f"{folder}: cannot create folder ({exc.strerror or exc})") from None
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise SdfastError(f"{taken[0]}: exists (use --overwrite to replace it)")
    return paths


def _save_image(image, path, prompt, seed, gen, overwrite):
    from ..io.png import a1111_parameters, save_png

    save_png(image, path, a1111_parameters(prompt, "", seed=seed, **gen), overwrite=overwrite)


def write_json(result: dict, path, overwrite: bool = False) -> Path:
    """Write `result` as JSON, atomically (a temporary file in the same folder, then renamed),
    so a reader never sees half a file. An existing file is refused unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise SdfastError(f"{path}: is a directory (name a file)")
    if path.exists() and not overwrite:
        raise SdfastError(f"{path}: exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise SdfastError(f"{path.parent}: no such directory")
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    publish_atomic(path, text_writer(text), overwrite)
    return path


def format_table(result: dict) -> str:
    """A readable summary: the settings, then accuracy and counts per attribute."""
    s = result["settings"]
    captions = "varied captions" if s["variety"] else "canonical captions"
    lines = [f"shapes eval: {result['n']} {_SPLIT_WORDS[s['split']]} prompts ({captions}), "
             f"seeds {s['seed']}..{s['seed'] + result['n'] - 1}",
             f"{s['sampler']} / {s['scheduler']}, {s['steps']} steps, cfg {s['cfg']:g}, "
             f"{s['width']}x{s['height']}, model {s['model'] or '(in memory)'}",
             "",
             f"{'attribute':<12}{'accuracy':>9}  correct"]
    for name in (*ATTRIBUTES, "all"):
        total = result["n"] if name == "all" else result["counts"][name]
        acc = result["accuracy"][name]
        shown = "-" if acc is None else f"{100 * acc:.1f}%"
        lines.append(f"{LABELS[name]:<12}{shown:>9}  {result['correct'][name]} / {total}")
    return "\n".join(lines)
