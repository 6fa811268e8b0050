"""Releasing the resident pages of file-mapped weights (sdfast.io.pages): memory goes back,
values never change, written pages and ordinary memory are left alone."""
import sys

import pytest
import torch

import sdfast
from _pipelines import family_of, make_reference, save_single_file
from sdfast.io.pages import populated_copy, release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pagemap")


def _rss_bytes():
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    ref = make_reference("small_sd1", tmp)
    return save_single_file(ref, family_of("small_sd1"), tmp / "model.safetensors")


def _touch(module):
    return sum(float(p.detach().reshape(-1)[::1024].sum()) for p in module.parameters())


def test_released_pages_leave_memory_and_come_back_unchanged(single):
    pipe = sdfast.load(single)
    ids = pipe.tokenizer(["a red circle", "x"])
    with torch.no_grad():
        before = pipe.text_encoder(ids)
    _touch(pipe.text_encoder)
    rss = _rss_bytes()
    released = release_pages(pipe.text_encoder)
    # the whole token table (49408 x 64 fp32, 12 MiB) was resident after the pass over it
    assert released >= 10 * 2 ** 20
    assert rss - _rss_bytes() >= released // 2          # other allocations may come and go
    assert release_pages(pipe.text_encoder) == 0        # nothing resident any more
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids), before)


def test_written_pages_and_ordinary_memory_keep_their_contents(single):
    pipe = sdfast.load(single)
    weight = pipe.text_encoder.token_embedding.weight
    with torch.no_grad():
        weight[:4096].mul_(2)                           # copy-on-write: now anonymous pages
    expected = weight.detach().clone()
    release_pages(pipe.text_encoder)
    assert torch.equal(weight, expected)
    half = sdfast.load(single, dtype=torch.float16)    # converted copies, not the file's pages
    _touch(half.unet)
    assert release_pages(half.unet) == 0


def test_generate_gives_the_same_images_with_and_without_releasing(single):
    pipe = sdfast.load(single)
    kw = dict(width=64, height=64, steps=2, seed=3, output="tensor", progress=False)
    assert pipe.release_weights is True
    first = pipe.generate("a red circle", **kw)
    second = pipe.generate("a red circle", **kw)          # weights mapped in again
    pipe.release_weights = False
    kept = pipe.generate("a red circle", **kw)
    assert torch.equal(first, second) and torch.equal(first, kept)


def test_populated_copy_is_an_exact_copy_in_new_memory(single):
    """The LoRA stack's copy of a touched weight: from a file-mapped weight whose pages were
    released (so the source must map again), and from ordinary memory of any size."""
    pipe = sdfast.load(single)
    weight = pipe.text_encoder.token_embedding.weight.data   # file-mapped, 12 MiB
    release_pages(pipe.text_encoder)
    for source in (weight, torch.randn(3, 5), torch.randn(1000, 999)[:, 1:]):
        copy = populated_copy(source)
        assert torch.equal(copy, source)
        assert copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
        copy.add_(1)                                          # writable, and independent
        assert not torch.equal(copy, source)
