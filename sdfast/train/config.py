"""Dataset configs in kohya's TOML format (sd-scripts `library/config_util.py`, `config_README`).

    [general]                      # defaults for every dataset and subset below
    shuffle_caption = true
    caption_extension = ".txt"
    keep_tokens = 1
    enable_bucket = true

    [[datasets]]
    resolution = 512               # or [width, height]
    batch_size = 4

      [[datasets.subsets]]
      image_dir = "train/images"   # relative paths are resolved against the TOML file's folder
      num_repeats = 10
      class_tokens = "sks dog"     # caption of an image that has no caption file
      # metadata_file = "meta.json"  kohya fine-tuning metadata: {image_key: {"caption": ...}}
      # is_reg = true                DreamBooth regularisation images
      # conditioning_data_dir = ...  ControlNet conditioning images (same stems as image_dir)

Options cascade as in kohya: a subset option may be set in `[general]`, in its `[[datasets]]`
table or in the subset; a dataset option in `[general]` or the dataset. Every key is checked:
an unknown key, a wrong type, a missing `image_dir` or `resolution`, a missing or empty folder
is an `SdfastError` that names the file and the field.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdfastError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CAPTION_EXTENSION = ".txt"
DEFAULT_BUCKET_STEP = 64
# kohya's defaults for --min_bucket_reso / --max_bucket_reso; clipped to the resolution below.
KOHYA_MIN_BUCKET = 256
KOHYA_MAX_BUCKET = 1024


@dataclass(frozen=True)
class SubsetConfig:
    """One `[[datasets.subsets]]` table, with the options it inherits filled in."""

    image_dir: Path
    caption_extension: str = DEFAULT_CAPTION_EXTENSION
    metadata_file: Path | None = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    conditioning_data_dir: Path | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0


@dataclass(frozen=True)
class DatasetConfig:
    """One `[[datasets]]` table. `resolution` is `(width, height)`; buckets hold at most
    `width * height` pixels, sides between `min_bucket_reso` and `max_bucket_reso`."""

    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = DEFAULT_BUCKET_STEP
    max_bucket_reso: int = KOHYA_MAX_BUCKET
    bucket_reso_steps: int = DEFAULT_BUCKET_STEP
    subsets: tuple[SubsetConfig, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DataConfig:
    """A whole TOML file: its path and its datasets."""

    path: Path
    datasets: tuple[DatasetConfig, ...]


# --------------------------------------------------------------------------- value checkers
def _bool(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int_at_least(low):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"expected an integer >= {low}, got {value!r}")
        return value
    return check


def _rate(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"expected a number in [0, 1], got {value!r}")
    return float(value)


def _text(value):
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _extension(value):
    value = _text(value)
    if not value.startswith(".") or len(value) < 2:
        raise ValueError(f"expected an extension starting with '.', got {value!r}")
    return value


def _multiple_of_8(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise ValueError(f"expected a positive multiple of 8, got {value!r}")
    return value


def _resolution(value):
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError(f"expected an integer or [width, height], got {value!r}")
        return (_multiple_of_8(value[0]), _multiple_of_8(value[1]))
    size = _multiple_of_8(value)
    return (size, size)


SUBSET_KEYS = {
    "image_dir": _text, "caption_extension": _extension, "metadata_file": _text,
    "num_repeats": _int_at_least(1), "is_reg": _bool, "class_tokens": _text,
    "conditioning_data_dir": _text, "shuffle_caption": _bool, "keep_tokens": _int_at_least(0),
    "caption_dropout_rate": _rate,
}
# Keys that name one folder or file: not inheritable from [general] / [[datasets]].
_SUBSET_ONLY = ("image_dir", "metadata_file", "conditioning_data_dir")
DATASET_KEYS = {
    "resolution": _resolution, "batch_size": _int_at_least(1), "enable_bucket": _bool,
    "min_bucket_reso": _multiple_of_8, "max_bucket_reso": _multiple_of_8,
    "bucket_reso_steps": _multiple_of_8,
}
_PATH_KEYS = _SUBSET_ONLY


# --------------------------------------------------------------------------- parsing
class _Where:
    """Builds error messages `FILE: FIELD: problem`."""

    def __init__(self, path):
        self.path = path

    def error(self, where, message):
        return SdfastError(f"{self.path}: {where}: {message}")


def _check_table(where, table, allowed, name):
    if not isinstance(table, dict):
        raise where.error(name, f"expected a table, got {table!r}")
    for key in table:
        if key not in allowed:
            raise where.error(f"{name}.{key}", "unknown key (known: "
                              + ", ".join(sorted(allowed)) + ")")


def _values(where, table, checkers, name):
    out = {}
    for key, value in table.items():
        if key in checkers:
            try:
                out[key] = checkers[key](value)
            except ValueError as exc:
                raise where.error(f"{name}.{key}", str(exc)) from None
    return out


def _read_toml(path):
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SdfastError(f"{path}: no such dataset config") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdfastError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise SdfastError(f"{path}: cannot read ({exc.strerror})") from None


def load_dataset_config(path) -> DataConfig:
    """Read and check a kohya dataset TOML; folders and metadata files are checked too."""
    path = Path(path)
    where = _Where(path)
    doc = _read_toml(path)
    _check_table(where, doc, {"general", "datasets"}, "top level")
    general = doc.get("general", {})
    _check_table(where, general, {**SUBSET_KEYS, **DATASET_KEYS}.keys() - set(_SUBSET_ONLY),
                 "general")
    general = _values(where, general, {**SUBSET_KEYS, **DATASET_KEYS}, "general")
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise where.error("datasets", "missing: at least one [[datasets]] table is required")
    base = path.parent
    return DataConfig(path=path, datasets=tuple(
        _dataset(where, table, general, f"datasets[{i}]", base)
        for i, table in enumerate(datasets)))


def _dataset(where, table, general, name, base):
    allowed = {**SUBSET_KEYS, **DATASET_KEYS, "subsets": None}.keys() - set(_SUBSET_ONLY)
    _check_table(where, table, allowed, name)
    values = {**general, **_values(where, table, {**SUBSET_KEYS, **DATASET_KEYS}, name)}
    if "resolution" not in values:
        raise where.error(f"{name}.resolution", "missing (set it in [general] or the dataset)")
    subsets = table.get("subsets")
    if not isinstance(subsets, list) or not subsets:
        raise where.error(f"{name}.subsets", "missing: at least one [[datasets.subsets]] "
                          "table is required")
    inherited = {k: v for k, v in values.items() if k in SUBSET_KEYS}
    dataset_values = {k: v for k, v in values.items() if k in DATASET_KEYS}
    dataset_values.update(_bucket_defaults(where, name, dataset_values))
    return DatasetConfig(**dataset_values, subsets=tuple(
        _subset(where, sub, inherited, f"{name}.subsets[{j}]", base)
        for j, sub in enumerate(subsets)))


def _bucket_defaults(where, name, values):
    """kohya's bucket range (256..1024), clipped so that it contains the resolution."""
    width, height = values["resolution"]
    low = values.get("min_bucket_reso", min(KOHYA_MIN_BUCKET, width, height))
    high = values.get("max_bucket_reso", max(KOHYA_MAX_BUCKET, width, height))
    short, long = min(width, height), max(width, height)
    if low > short:
        raise where.error(f"{name}.min_bucket_reso",
                          f"{low} is larger than the resolution's shorter side {short}")
    if high < long:
        raise where.error(f"{name}.max_bucket_reso",
                          f"{high} is smaller than the resolution's longer side {long}")
    return {"min_bucket_reso": low, "max_bucket_reso": high}


def _subset(where, table, inherited, name, base):
    _check_table(where, table, SUBSET_KEYS, name)
    values = {**inherited, **_values(where, table, SUBSET_KEYS, name)}
    if "image_dir" not in values:
        raise where.error(f"{name}.image_dir", "missing")
    for key in _PATH_KEYS:
        if key in values:
            values[key] = (base / os.path.expanduser(values[key])).resolve()
    _check_folder(where, f"{name}.image_dir", values["image_dir"], need_images=True)
    if "conditioning_data_dir" in values:
        _check_folder(where, f"{name}.conditioning_data_dir", values["conditioning_data_dir"],
                      need_images=True)
    if "metadata_file" in values:
        read_metadata(values["metadata_file"], f"{where.path}: {name}.metadata_file")
    return SubsetConfig(**values)


def list_images(folder):
    """The image files directly inside `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_folder(where, name, folder, need_images):
    if not folder.is_dir():
        raise where.error(name, f"{folder}: no such folder")
    if need_images and not list_images(folder):
        raise where.error(name, f"{folder}: holds no images ("
                          + ", ".join(IMAGE_EXTENSIONS) + ")")


def read_metadata(path, context):
    """kohya fine-tuning metadata: `{image_key: {"caption": str, "tags": str, ...}}`.
    Errors start with `context` (the config file and field)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdfastError(f"{context}: {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdfastError(f"{context}: {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise SdfastError(f"{context}: {path}: expected a non-empty JSON object "
                          "{image_key: {\"caption\": ...}}")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise SdfastError(f"{context}: {path}: entry {key!r} is not an object")
        for field_name in ("caption", "tags"):
            if field_name in entry and not isinstance(entry[field_name], str):
                raise SdfastError(f"{context}: {path}: {key!r}.{field_name} is not a string")
    return data


__all__ = ["SubsetConfig", "DatasetConfig", "DataConfig", "load_dataset_config", "list_images",
           "read_metadata", "IMAGE_EXTENSIONS", "SUBSET_KEYS", "DATASET_KEYS"]
