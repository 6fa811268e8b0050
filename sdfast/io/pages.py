"""Giving back the resident pages of memory-mapped weights a pipeline is not using.

A CPU fp32 load keeps every weight in the safetensors file's (private, copy-on-write) mapping:
a page becomes resident when a layer first reads it and then stays counted in the process's
memory although the kernel holds the same bytes in its page cache. `release_pages(module)`
drops the module's clean file pages from this process (`madvise(MADV_DONTNEED)`); the next read
maps them again from the page cache (a minor fault, no disk read while the cache keeps them),
so the weights' values never change.

Only pages that `/proc/self/pagemap` shows as file pages (or not resident and not swapped) are
released: a page a program wrote to (copy-on-write, now anonymous memory) keeps its contents,
and tensors in ordinary memory (fp16 conversions, LoRA-merged copies, CUDA weights) are left
alone. Only pages wholly inside the module's tensors are touched. Linux only; elsewhere (and
where pagemap cannot be read) nothing is released.
"""
import ctypes
import mmap
import os
import sys

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23
_MADV_HUGEPAGE = 14
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61
_libc = None


def _ranges(tensors):
    """Coalesced `[start, end)` byte ranges of the tensors' CPU storages, sorted."""
    spans = sorted({(s.data_ptr(), s.data_ptr() + s.nbytes())
                    for s in (t.untyped_storage() for t in tensors if t.device.type == "cpu")
                    if s.nbytes() >= PAGE})
    out = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _releasable(first_page, count, pagemap):
    """Per page: True where releasing cannot lose data (a clean file page, or not resident
    and not swapped), and whether it is resident now."""
    pagemap.seek(first_page * 8)
    entries = np.frombuffer(pagemap.read(count * 8), dtype=np.uint64)
    present = (entries & np.uint64(_PRESENT)) != 0
    file = (entries & np.uint64(_FILE)) != 0
    swapped = (entries & np.uint64(_SWAPPED)) != 0
    return (present & file) | (~present & ~swapped), present


def _madvise(addr, length, advice=_MADV_DONTNEED):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(addr, length, advice) == 0


def _advise(tensor, *advices):
    start = tensor.untyped_storage().data_ptr()
    first = start // PAGE * PAGE
    for advice in advices:
        _madvise(first, start + tensor.untyped_storage().nbytes() - first, advice)


def _populating(t):
    return sys.platform.startswith("linux") and t.device.type == "cpu" and t.nbytes >= 16 * PAGE


def populated_empty_like(t):
    """`torch.empty_like(t)` (its strides kept) whose pages are mapped in one call before
    anything writes them: transparent huge pages where the kernel offers them on request
    (`MADV_HUGEPAGE`: a third less time to map here than 4 KiB pages), then
    `MADV_POPULATE_WRITE` (Linux 5.14+). Writing it then runs without a page fault per 4 KiB
    (the faults made a clone of LoRA-touched weights several times slower than the copy itself).
    Elsewhere, or where the kernel refuses the advice, a plain `empty_like`."""
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    if _populating(t):
        _advise(out, _MADV_HUGEPAGE, _MADV_POPULATE_WRITE)
    return out


def map_pages(t):
    """Map the CPU tensor `t`'s pages into this process in one call (`MADV_POPULATE_READ`: a
    loader's mmap read without a fault per 4 KiB); returns `t`."""
    if _populating(t):
        _advise(t, _MADV_POPULATE_READ)
    return t


def populated_copy(t):
    """A copy of the CPU tensor `t` in `populated_empty_like` memory, its source pages mapped
    the same way first (`MADV_POPULATE_READ`)."""
    out = populated_empty_like(t)
    return out.copy_(map_pages(t))


def _runs(mask):
    """`(start, stop)` index runs where `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return zip(edges[0::2], edges[1::2])


def release_pages(*modules):
    """Drop the resident clean file pages of the modules' parameters and buffers from this
    process. Returns the bytes that were resident and are released."""
    if not sys.platform.startswith("linux"):
        return 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    released = 0
    try:
        pagemap = open(f"/proc/{os.getpid()}/pagemap", "rb", buffering=0)
    except OSError:
        return 0
    with pagemap:
        for start, end in _ranges(tensors):
            first, last = -(-start // PAGE), end // PAGE       # pages wholly inside
            if last <= first:
                continue
            ok, present = _releasable(first, last - first, pagemap)
            for a, b in _runs(ok):
                if _madvise((first + int(a)) * PAGE, (int(b) - int(a)) * PAGE):
                    released += int(present[a:b].sum()) * PAGE
    return released


__all__ = ["release_pages", "populated_copy", "populated_empty_like", "map_pages"]
