"""kohya dataset configs: every field, every kind of bad config, buckets, captions, batch order."""
import json

import numpy as np
import pytest
from PIL import Image

from sdfast.errors import SdfastError
from sdfast.train.buckets import fit_to_bucket, make_buckets, nearest_bucket
from sdfast.train.config import load_dataset_config
from sdfast.train.dataset import TrainData, load_image, process_caption


def image(path, size=(64, 64), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def folder(root, name, n=3, size=(64, 64), captions=True, ext=".txt"):
    out = root / name
    for i in range(n):
        image(out / f"{i:03d}.png", size)
        if captions:
            (out / f"{i:03d}{ext}").write_text(f"caption {name} {i}, red, circle\nsecond line\n")
    return out


def toml(root, text, name="data.toml"):
    path = root / name
    path.write_text(text)
    return path


FULL = """
[general]
shuffle_caption = true
caption_extension = ".cap"
keep_tokens = 1
enable_bucket = true

[[datasets]]
resolution = [128, 96]
batch_size = 3
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 4
  class_tokens = "sks dog"
  caption_dropout_rate = 0.25

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  caption_extension = ".txt"
  keep_tokens = 0
  shuffle_caption = false
  conditioning_data_dir = "cond"

[[datasets]]
resolution = 64
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "ft"
  metadata_file = "meta.json"
"""


def test_every_field_is_read_and_inherited(tmp_path):
    folder(tmp_path, "a", ext=".cap")
    folder(tmp_path, "reg")
    folder(tmp_path, "cond", captions=False)
    folder(tmp_path, "ft", captions=False)
    (tmp_path / "meta.json").write_text(json.dumps({"000": {"caption": "x"}}))
    cfg = load_dataset_config(toml(tmp_path, FULL))
    d0, d1 = cfg.datasets
    assert (d0.resolution, d0.batch_size, d0.enable_bucket) == ((128, 96), 3, True)
    assert (d0.min_bucket_reso, d0.max_bucket_reso, d0.bucket_reso_steps) == (64, 256, 32)
    a, reg = d0.subsets
    assert a.image_dir == (tmp_path / "a").resolve()            # relative to the TOML file
    assert (a.num_repeats, a.class_tokens, a.caption_dropout_rate) == (4, "sks dog", 0.25)
    assert (a.shuffle_caption, a.keep_tokens, a.caption_extension) == (True, 1, ".cap")  # general
    assert (a.is_reg, a.metadata_file, a.conditioning_data_dir) == (False, None, None)
    assert (reg.is_reg, reg.caption_extension, reg.keep_tokens, reg.shuffle_caption) == \
        (True, ".txt", 0, False)
    assert reg.conditioning_data_dir == (tmp_path / "cond").resolve()
    assert (d1.resolution, d1.batch_size, d1.enable_bucket) == ((64, 64), 1, False)
    assert d1.subsets[0].metadata_file == (tmp_path / "meta.json").resolve()
    assert d1.subsets[0].shuffle_caption is True                  # general reaches dataset 2


BASE = '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n'


@pytest.mark.parametrize("text, field, words", [
    ('[general]\nshufle_caption = true\n' + BASE, "general.shufle_caption", "unknown key"),
    ('[[datasets]]\nresolution = 64\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "datasets[0].batchsize", "unknown key"),
    (BASE + 'num_repeat = 2\n', "datasets[0].subsets[0].num_repeat", "unknown key"),
    ('[extra]\n' + BASE, "top level.extra", "unknown key"),
    ('[general]\nimage_dir = "a"\n' + BASE, "general.image_dir", "unknown key"),
    (BASE + 'num_repeats = "3"\n', "datasets[0].subsets[0].num_repeats", "integer"),
    (BASE + 'num_repeats = 0\n', "datasets[0].subsets[0].num_repeats", ">= 1"),
    (BASE + 'is_reg = 1\n', "datasets[0].subsets[0].is_reg", "true or false"),
    (BASE + 'caption_extension = "txt"\n', "datasets[0].subsets[0].caption_extension", "'.'"),
    (BASE + 'caption_dropout_rate = 2\n', "datasets[0].subsets[0].caption_dropout_rate", "[0, 1]"),
    ('[general]\nshuffle_caption = "yes"\n' + BASE, "general.shuffle_caption", "true or false"),
    ('[[datasets]]\nresolution = 60\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "datasets[0].resolution", "multiple of 8"),
    ('[[datasets]]\nresolution = [64]\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "datasets[0].resolution", "[width, height]"),
    ('[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "datasets[0].resolution", "missing"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n',
     "datasets[0].subsets[0].image_dir", "missing"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "nope"\n',
     "datasets[0].subsets[0].image_dir", "no such folder"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "empty"\n',
     "datasets[0].subsets[0].image_dir", "holds no images"),
    (BASE + 'conditioning_data_dir = "empty"\n', "datasets[0].subsets[0].conditioning_data_dir",
     "holds no images"),
    (BASE + 'metadata_file = "missing.json"\n', "datasets[0].subsets[0].metadata_file",
     "no such file"),
    (BASE + 'metadata_file = "bad.json"\n', "datasets[0].subsets[0].metadata_file", "JSON"),
    ('[general]\nenable_bucket = true\n', "datasets", "missing"),
    ('[[datasets]]\nresolution = 64\n', "datasets[0].subsets", "missing"),
    ('[[datasets]]\nresolution = 64\nmin_bucket_reso = 128\n[[datasets.subsets]]\n'
     'image_dir = "a"\n', "datasets[0].min_bucket_reso", "larger than"),
    ('[[datasets]\nresolution = 64\n', "", "not valid TOML"),
])
def test_bad_config_names_field_and_file(tmp_path, text, field, words):
    folder(tmp_path, "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    path = toml(tmp_path, text)
    with pytest.raises(SdfastError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert field in message and words in message, message


def test_missing_config_file(tmp_path):
    with pytest.raises(SdfastError, match="no such dataset config"):
        load_dataset_config(tmp_path / "nope.toml")


def test_buckets_follow_kohya():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        assert 256 <= min(w, h) and max(w, h) <= 1024
        assert (h, w) in buckets
        # one side is the largest step multiple that the area allows for the other (kohya's rule)
        assert (h + 64) * w > 512 * 512 or (w + 64) * h > 512 * 512 or 1024 in (w, h)
    assert (256, 1024) in buckets and (320, 768) in buckets and (448, 576) in buckets
    assert make_buckets((64, 64), 64, 1024, 64) == [(64, 64)]
    assert nearest_bucket((1000, 500), buckets) == (704, 320)      # 2.2 is nearest to 2.0
    assert nearest_bucket((500, 500), buckets) == (512, 512)
    assert nearest_bucket((300, 900), buckets) == (256, 832)       # 0.308 vs 1/3


def test_fit_to_bucket_scales_to_cover_then_centre_crops():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 100))           # left third white
    out = fit_to_bucket(img, (128, 64))                      # scale 0.64 -> 192x64, crop 32..160
    assert out.size == (128, 64)
    arr = np.asarray(out)
    assert arr[:, :20].mean() > 200 and arr[:, -20:].mean() < 50


def test_bucketed_dataset_batches_stay_in_one_bucket(tmp_path):
    for i, size in enumerate([(128, 128), (300, 100), (290, 100), (100, 300), (100, 290),
                              (130, 128), (256, 64)]):
        image(tmp_path / "imgs" / f"{i}.png", size)
        (tmp_path / "imgs" / f"{i}.txt").write_text(f"img {i}")
    path = toml(tmp_path, '[general]\nenable_bucket = true\n[[datasets]]\nresolution = 128\n'
                'batch_size = 2\nmin_bucket_reso = 64\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
                'num_repeats = 2\n')
    data = TrainData(load_dataset_config(path))
    sizes = [item.size for item in data.items]
    assert sizes == [(128, 128), (192, 64), (192, 64), (64, 192), (64, 192), (128, 128), (256, 64)]
    batches = data.epoch_batches(seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == sorted(list(range(7)) * 2)
    for batch in batches:
        assert len({sizes[i] for i in batch}) == 1 and 1 <= len(batch) <= 2
    assert data.pixels(batches[0]).shape[2:] == sizes[batches[0][0]][::-1]
    assert batches == data.epoch_batches(0, 0) and batches != data.epoch_batches(0, 1)


def test_captions_from_files_metadata_and_class_tokens(tmp_path):
    folder(tmp_path, "a", n=2)
    image(tmp_path / "b" / "x.png")
    image(tmp_path / "ft" / "one.png")
    image(tmp_path / "ft" / "two.jpg")
    (tmp_path / "meta.json").write_text(json.dumps({
        "one": {"caption": "a cat", "tags": "cute, small"}, "two.jpg": {"tags": "dog"}}))
    path = toml(tmp_path, '[[datasets]]\nresolution = 64\n'
                '[[datasets.subsets]]\nimage_dir = "a"\n'
                '[[datasets.subsets]]\nimage_dir = "b"\nclass_tokens = "sks thing"\n'
                '[[datasets.subsets]]\nimage_dir = "ft"\nmetadata_file = "meta.json"\n')
    data = TrainData(load_dataset_config(path))
    assert [item.caption for item in data.items] == [
        "caption a 0, red, circle", "caption a 1, red, circle", "sks thing",
        "a cat, cute, small", "dog"]
    data.check_captions()
    (tmp_path / "c").mkdir()
    image(tmp_path / "c" / "y.png")
    bad = toml(tmp_path, '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "c"\n',
               "bad.toml")
    with pytest.raises(SdfastError, match="y.png: no caption"):
        TrainData(load_dataset_config(bad)).check_captions()


def test_metadata_key_without_image_is_an_error(tmp_path):
    image(tmp_path / "ft" / "one.png")
    (tmp_path / "meta.json").write_text(json.dumps({"missing": {"caption": "a"}}))
    path = toml(tmp_path, '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                'image_dir = "ft"\nmetadata_file = "meta.json"\n')
    with pytest.raises(SdfastError, match="'missing': no such image"):
        TrainData(load_dataset_config(path))


def test_shuffle_caption_keeps_tokens_and_dropout(tmp_path):
    folder(tmp_path, "a", n=1)
    subset = load_dataset_config(toml(
        tmp_path, BASE + 'shuffle_caption = true\nkeep_tokens = 2\n')).datasets[0].subsets[0]
    caption = "first, second, c, d, e, f, g"
    seen = set()
    for seed in range(20):
        out = process_caption(caption, subset, np.random.default_rng(seed))
        pieces = out.split(", ")
        assert pieces[:2] == ["first", "second"] and sorted(pieces[2:]) == list("cdefg")
        seen.add(out)
    assert len(seen) > 5
    drop = load_dataset_config(toml(tmp_path, BASE + 'caption_dropout_rate = 0.5\n',
                                    "d.toml")).datasets[0].subsets[0]
    outs = [process_caption(caption, drop, np.random.default_rng(s)) for s in range(200)]
    assert 60 < outs.count("") < 140 and set(outs) == {"", caption}


def test_micro_batches_shard_and_restart(tmp_path):
    folder(tmp_path, "a", n=5)
    data = TrainData(load_dataset_config(toml(
        tmp_path, BASE.replace("resolution = 64", "resolution = 64\nbatch_size = 2")
        + "num_repeats = 2\n")))
    assert len(data.epoch_batches(3, 0)) == 5                      # 10 images in batches of 2
    whole = data.micro_batches(seed=3, start=0, count=9)
    assert [b.epoch for b in whole] == [0] * 5 + [1] * 4
    assert data.micro_batches(3, 6, 3) == whole[6:9]               # restart at any index
    r0 = data.micro_batches(3, 0, 4, rank=0, world=2)
    r1 = data.micro_batches(3, 0, 4, rank=1, world=2)
    epoch0 = data.epoch_batches(3, 0)[:4]                           # 5 batches -> 4 shared
    assert [list(b.indices) for b in r0[:2] + r1[:2]] == epoch0[0::2] + epoch0[1::2]
    assert r0[2].epoch == 1


def test_load_image_range_and_size(tmp_path):
    path = image(tmp_path / "i.png", (100, 50), (255, 0, 127))
    pixels = load_image(path, (64, 32))
    assert pixels.shape == (3, 32, 64)
    assert pixels[0].min() == 1.0 and pixels[1].max() == -1.0
    assert abs(float(pixels[2].mean()) - (127 / 127.5 - 1)) < 1e-6
