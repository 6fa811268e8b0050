"""A1111's extra-network tags for LoRAs in prompts: `<lora:name>`, `<lora:name:0.8>`,
`<lora:name:0.5:1>` (text encoder, then UNet), `<lora:name:te=0.5:unet=1>` (`lyco:` is read as
`lora:`; A1111's `dyn=` is accepted and ignored). As in A1111, one number sets both strengths,
and a missing UNet strength is the text-encoder one. Tags are removed from the prompt text.
"""
import math
import os
import re
from dataclasses import dataclass

from sdfast.errors import SdfastError

_TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
LORA_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class LoraTag:
    name: str
    unet: float
    te: float


def _number(text, tag):
    try:
        value = float(text)
    except ValueError:
        raise SdfastError(f"bad strength {text!r} in prompt tag <{tag}>") from None
    if not math.isfinite(value):
        raise SdfastError(f"bad strength {text!r} in prompt tag <{tag}> (must be finite)")
    return value


def parse_tag(body, kind="lora"):
    """`LoraTag` of the text between `<lora:` and `>`."""
    parts = body.split(":")
    name = parts[0].strip()
    if not name:
        raise SdfastError(f"prompt tag <{kind}:{body}> names no LoRA")
    positional, named = [], {}
    for part in parts[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            named[key.strip().lower()] = value.strip()
        else:
            positional.append(part.strip())
    unknown = set(named) - {"te", "unet", "dyn"}
    if unknown:
        raise SdfastError(f"prompt tag <{kind}:{body}>: unknown setting(s) {', '.join(sorted(unknown))} "
                          "(known: te, unet, dyn)")
    if len(positional) > 2 or "dyn" in named:
        raise SdfastError(f"prompt tag <{kind}:{body}>: sdfast takes a LoRA's strengths (te, unet) "
                          "but not A1111's third value, dyn (a rank limit)")
    te = _number(named.get("te", positional[0] if positional else "1"), f"{kind}:{body}")
    unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), f"{kind}:{body}")
    return LoraTag(name, unet, te)


def extract_lora_tags(prompt):
    """`(prompt without the tags, [LoraTag, ...])`."""
    tags = [parse_tag(m[2], m[1].lower()) for m in _TAG.finditer(prompt)]
    return _TAG.sub("", prompt), tags


def find_lora(name, lora_dir):
    """The file for `<lora:name>` in `lora_dir` (searched recursively, by file name without
    extension, as A1111 does). Raises SdfastError when there is none."""
    if lora_dir is None:
        raise SdfastError(f"the prompt names <lora:{name}> but no LoRA folder is set "
                          "(lora_dir= / --lora-dir)")
    if not os.path.isdir(lora_dir):
        raise SdfastError(f"{lora_dir}: no such LoRA folder")
    found = []
    for root, _, files in os.walk(lora_dir):
        for file in files:
            stem, ext = os.path.splitext(file)
            if stem == name and ext.lower() in LORA_EXTS:
                found.append(os.path.join(root, file))
    if not found:
        raise SdfastError(f"unknown LoRA {name!r}: no {name}.safetensors (or .pt/.ckpt/.bin) "
                          f"in {lora_dir}")
    return sorted(found, key=lambda p: (LORA_EXTS.index(os.path.splitext(p)[1].lower()), p))[0]


__all__ = ["LoraTag", "parse_tag", "extract_lora_tags", "find_lora", "LORA_EXTS"]
