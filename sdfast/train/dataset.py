"""Training images from a kohya dataset config: captions, buckets, and the seeded batch order.

Captions come from the subset's `metadata_file` (kohya fine-tuning metadata: `caption`, with
`tags` appended after ", "), else from the caption file beside each image (first line of
`<stem><caption_extension>`), else from `class_tokens`; an image with none of these has caption
None (fine for VAE training; a text-conditioned method refuses it).

The batch order is a pure function of `(seed, epoch)`: each dataset's images (repeated
`num_repeats` times) are grouped by bucket and shuffled, cut into batches of the dataset's
`batch_size` (the last batch of a bucket may be smaller), and all batches are shuffled together.
Regularisation images (`is_reg` subsets, DreamBooth's class images) do not form batches of their
own: each batch of instance images gets as many class images appended, taken in turn from a
per-epoch shuffle of the class images of the same bucket (of all class images when its bucket
has none; they are then fitted to the batch's bucket), so every batch holds both kinds.
With several processes, each epoch's batch list is cut to a multiple of the process count and
process `r` takes batches `r, r + n, ...`. Caption shuffling and dropout use a generator seeded
by `(seed, epoch, batch, slot)`, with `batch` the index in the epoch's whole batch list, so n
processes see what one process sees. A run can therefore restart at any step with no saved state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SdfastError
from .buckets import fit_to_bucket, make_buckets, nearest_bucket
from .config import IMAGE_EXTENSIONS, DataConfig, SubsetConfig, list_images, read_metadata


@dataclass(frozen=True)
class Item:
    """One training image and what to do with it."""

    image: Path
    caption: str | None
    subset: SubsetConfig
    dataset: int                    # index into DataConfig.datasets
    size: tuple[int, int]           # (width, height) it is trained at: its bucket
    conditioning: Path | None = None


@dataclass(frozen=True)
class MicroBatch:
    """Which items one forward/backward pass uses, and where it sits in the run."""

    epoch: int
    number: int                     # index in the epoch's batch list (over all processes)
    indices: tuple[int, ...]


def _first_line(path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SdfastError(f"{path}: caption file is not UTF-8 text") from None
    except OSError as exc:
        raise SdfastError(f"{path}: cannot read the caption ({exc.strerror or exc})") from None
    return text.splitlines()[0].strip() if text.strip() else ""


def _find_image(folder, key):
    """kohya's lookup of a metadata key: a path to an image, or a stem inside `folder`."""
    for candidate in (Path(key), folder / key):
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{key}{ext}").is_file():
            return folder / f"{key}{ext}"
    return None


def _metadata_captions(subset, config_path):
    data = read_metadata(subset.metadata_file, f"{config_path}: metadata_file")
    out = []
    for key, entry in data.items():
        image = _find_image(subset.image_dir, key)
        if image is None:
            raise SdfastError(f"{subset.metadata_file}: {key!r}: no such image in "
                              f"{subset.image_dir}")
        caption, tags = entry.get("caption"), entry.get("tags")
        if caption is None:
            caption = tags
        elif tags:
            caption = f"{caption}, {tags}"
        out.append((image, caption if caption is not None else subset.class_tokens))
    return out


def _folder_captions(subset):
    out = []
    for image in list_images(subset.image_dir):
        caption_file = image.with_suffix(subset.caption_extension)
        caption = _first_line(caption_file) if caption_file.is_file() else subset.class_tokens
        out.append((image, caption))
    return out


def _conditioning_image(subset, image):
    for ext in IMAGE_EXTENSIONS:
        candidate = subset.conditioning_data_dir / f"{image.stem}{ext}"
        if candidate.is_file():
            return candidate
    raise SdfastError(f"{subset.conditioning_data_dir}: no conditioning image for {image.name}")


def image_size(path):
    """`(width, height)` read from the file header."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as exc:
        raise SdfastError(f"{path}: not a readable image ({exc})") from None


class TrainData:
    """Every image of a `DataConfig` as `Item`s, with the per-epoch batch order."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.items: list[Item] = []
        self._repeats: list[int] = []
        for d, dataset in enumerate(config.datasets):
            buckets = (make_buckets(dataset.resolution, dataset.min_bucket_reso,
                                    dataset.max_bucket_reso, dataset.bucket_reso_steps)
                       if dataset.enable_bucket else [dataset.resolution])
            for subset in dataset.subsets:
                pairs = (_metadata_captions(subset, config.path) if subset.metadata_file
                         else _folder_captions(subset))
                for image, caption in pairs:
                    size = nearest_bucket(image_size(image), buckets)
                    cond = (_conditioning_image(subset, image) if subset.conditioning_data_dir
                            else None)
                    self.items.append(Item(image, caption, subset, d, size, cond))
                    self._repeats.append(subset.num_repeats)

    def __len__(self):
        return len(self.items)

    @property
    def has_reg(self):
        """Whether any image comes from an `is_reg` subset."""
        return any(item.subset.is_reg for item in self.items)

    def check_captions(self):
        """Refuse images without a caption (methods that condition on text call this)."""
        missing = [item.image for item in self.items if item.caption is None]
        if missing:
            raise SdfastError(f"{missing[0]}: no caption (no caption file, metadata entry or "
                              f"class_tokens); {len(missing)} image(s) lack one")

    def _by_bucket(self, keep):
        """`{size: [item index, repeated num_repeats times]}` of the items `keep` accepts."""
        by_bucket = {}
        for index, (item, repeats) in enumerate(zip(self.items, self._repeats)):
            if keep(item):
                by_bucket.setdefault(item.size, []).extend([index] * repeats)
        return by_bucket

    def epoch_batches(self, seed, epoch):
        """All batches of `epoch` (lists of item indices), in training order."""
        rng = np.random.default_rng([seed, epoch, 0])
        batches = []
        for d, dataset in enumerate(self.config.datasets):
            by_bucket = self._by_bucket(lambda item: item.dataset == d and not item.subset.is_reg)
            for size in sorted(by_bucket):
                order = rng.permutation(by_bucket[size]).tolist()
                batches += [order[i:i + dataset.batch_size]
                            for i in range(0, len(order), dataset.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.has_reg:
            batches = self._add_class_images(batches, np.random.default_rng([seed, epoch, 2]))
        return batches

    def _add_class_images(self, batches, rng):
        """Append to each batch as many class images as it has instance images (module
        docstring): from the batch's bucket when it has class images, else from all."""
        pools = {size: rng.permutation(indices).tolist()
                 for size, indices in sorted(self._by_bucket(lambda i: i.subset.is_reg).items())}
        pools[None] = rng.permutation(sorted(i for p in pools.values() for i in p)).tolist()
        taken = dict.fromkeys(pools, 0)
        out = []
        for batch in batches:
            size = self.items[batch[0]].size
            key = size if size in pools else None
            pool, start = pools[key], taken[key]
            out.append(batch + [pool[(start + k) % len(pool)] for k in range(len(batch))])
            taken[key] = start + len(batch)
        return out

    def process_batches(self, seed, epoch, rank=0, world=1):
        """This process's share of `epoch_batches` (see module docstring)."""
        batches = self.epoch_batches(seed, epoch)
        usable = len(batches) - len(batches) % world
        if usable == 0:
            raise SdfastError(f"{self.config.path}: {len(batches)} batch(es) per epoch cannot "
                              f"be shared by {world} processes")
        return batches[:usable][rank::world]

    def micro_batches(self, seed, start, count, rank=0, world=1):
        """`count` MicroBatches of this process from global micro-batch index `start`."""
        per_epoch = len(self.process_batches(seed, 0, rank, world))
        epoch, number = divmod(start, per_epoch)
        out = []
        while len(out) < count:
            batches = self.process_batches(seed, epoch, rank, world)
            out += [MicroBatch(epoch, n * world + rank, tuple(batches[n]))
                    for n in range(number, min(len(batches), number + count - len(out)))]
            epoch, number = epoch + 1, 0
        return out

    def captions(self, batch: MicroBatch, seed):
        """The batch's captions after kohya's shuffle_caption / keep_tokens / dropout."""
        out = []
        for slot, index in enumerate(batch.indices):
            item = self.items[index]
            rng = np.random.default_rng([seed, batch.epoch, batch.number, slot, 1])
            out.append(process_caption(item.caption or "", item.subset, rng))
        return out

    def batch_size_of(self, indices):
        """`(w, h)` a batch is trained at: its first item's bucket (class images that come from
        another bucket are fitted to it)."""
        return self.items[indices[0]].size

    def pixels(self, indices):
        """Images `[B, 3, h, w]` in [-1, 1]."""
        size = self.batch_size_of(indices)
        return torch.stack([load_image(self.items[i].image, size) for i in indices])

    def hints(self, indices):
        """ControlNet conditioning images `[B, 3, h, w]` in [0, 1], fitted like the images."""
        size = self.batch_size_of(indices)
        return torch.stack([(load_image(self.items[i].conditioning, size) + 1) / 2
                            for i in indices])


def process_caption(caption, subset: SubsetConfig, rng):
    """kohya: drop the whole caption with `caption_dropout_rate`; with `shuffle_caption`, split
    at commas, keep the first `keep_tokens` pieces in place and shuffle the rest."""
    if subset.caption_dropout_rate and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.shuffle_caption:
        pieces = [piece.strip() for piece in caption.split(",")]
        keep, rest = pieces[:subset.keep_tokens], pieces[subset.keep_tokens:]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        caption = ", ".join(keep + rest)
    return caption


def load_image(path, size):
    """An RGB image fitted to `size` `(w, h)` as `[3, h, w]` float32 in [-1, 1]."""
    with Image.open(path) as image:
        image = fit_to_bucket(image.convert("RGB"), size)
        array = np.asarray(image, dtype=np.float32)           # [h, w, 3] in 0..255
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # -> [3, h, w]


INPUTS = ("pixels", "hints")


class BatchLoader(torch.utils.data.Dataset):
    """Map-style dataset over a fixed list of MicroBatches (for a torch DataLoader with
    `batch_size=None`): item `i` is `(i, {name: tensor})` with the `inputs` asked for ("pixels",
    "hints": `TrainData` methods); order is kept with workers."""

    def __init__(self, data: TrainData, batches, inputs=("pixels",)):
        unknown = set(inputs) - set(INPUTS)
        if unknown:
            raise ValueError(f"unknown batch inputs {sorted(unknown)}; known: {INPUTS}")
        self.data = data
        self.batches = batches
        self.inputs = tuple(inputs)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        indices = self.batches[i].indices
        return i, {name: getattr(self.data, name)(indices) for name in self.inputs}


__all__ = ["Item", "MicroBatch", "TrainData", "BatchLoader", "INPUTS", "process_caption",
           "load_image", "image_size"]
