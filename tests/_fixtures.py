"""Shared test helpers: reference artefacts built from sdfast's shipped data, and `lock`."""
import os

from sdfast.bench.arch import write_clip_tokenizer_dir

__all__ = ["write_clip_tokenizer_dir", "lock"]


def lock(monkeypatch, folder):
    """`os.access` says `folder` is not writable (the tests may run as root, which writes
    anywhere, so the folder's mode cannot show it)."""
    real, locked = os.access, os.path.abspath(folder)

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) == locked:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
