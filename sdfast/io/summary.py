"""`sdfast info`: what a checkpoint is, from its keys and shapes alone (no model is built)."""
import math

from .detect import detect, split_components
from .load import read_any


def _count(sd):
    return sum(math.prod(t.shape) for t in sd.values())


def summarize(path):
    sd, metadata = read_any(path)
    info = detect(sd, metadata)
    unet, vae, text = split_components(sd, info.family)
    counts = {"unet": _count(unet), "vae": _count(vae), "text_encoder": _count(text)}
    return {
        "family": info.family,
        "prediction": f"{info.prediction} ({info.prediction_source})",
        "inpaint": info.inpaint,
        **{f"parameters.{name}": f"{n:,}" for name, n in counts.items()},
        "parameters.total": f"{sum(counts.values()):,}",
    }
