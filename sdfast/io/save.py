"""Writing LDM single-file checkpoints: the inverse of `detect.split_components`, saved atomically
(a temporary file in the same folder, then a rename), never replacing a file unless asked."""
import errno
import os
import tempfile

from ..errors import SdfastError, WriteError
from .detect import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

# Metadata keys the loader reads back (settings that cannot be read from weight shapes).
UNET_HEADS_KEY = "sdfast.unet.num_heads"
UNET_HEAD_DIM_KEY = "sdfast.unet.head_dim"


def ldm_state_dict(unet, vae, text_encoder, family, dtype=None):
    """One LDM-keyed dict of all three components (shares storage unless `dtype` converts)."""
    text_prefix = OPENCLIP_PREFIX if family == "sd2" else CLIP_PREFIX
    out = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (text_prefix, text_encoder)):
        for key, value in module.state_dict().items():
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[prefix + key] = value.contiguous().cpu()
    return out


def model_metadata(unet, family, prediction):
    """The settings a checkpoint needs beside its weights, as safetensors metadata."""
    meta = {"sdfast.family": family, "sdfast.prediction": prediction}
    config = unet.config
    if getattr(config, "head_dim", None):
        meta[UNET_HEAD_DIM_KEY] = str(config.head_dim)
    elif getattr(config, "num_heads", None):
        meta[UNET_HEADS_KEY] = str(config.num_heads)
    return meta


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# errnos of a file system without hard links (os.link): fall back to reserving the name
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS,
             errno.EXDEV}


def _link_new(tmp, path):
    """Give the finished file `tmp` the name `path`, which must not exist: FileExistsError
    rather than replace a file, even one that appeared since it was checked."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # reserve the name
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.remove(path)                 # the empty file reserved just above
        raise


def check_folder(path, what, shown=None):
    """Refuse, before any work, a folder that cannot be used for output: `path` is a file, lies
    under a file, or its nearest existing folder is not writable. Creates nothing. `what`: the
    option named in the message; `shown`: the path the user gave (default `path`)."""
    shown = os.fspath(path if shown is None else shown)
    target = os.path.abspath(os.fspath(path))
    probe = target
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        if probe == target:
            if shown != os.fspath(path):      # the folder of the file the user named
                raise SdfastError(f"{what} {shown}: {probe} is not a folder")
            raise SdfastError(f"{what} {shown}: exists and is not a folder")
        raise SdfastError(f"{what} {shown}: {probe} is not a folder (cannot create a folder "
                          "under it)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SdfastError(f"{what} {shown}: {probe} is not writable")


def make_folder(path, what, shown=None, error=SdfastError):
    """`os.makedirs(path, exist_ok=True)`; a path that cannot be a folder (`check_folder`'s
    reasons, e.g. a file in the way) or an OSError is a one-line `error`."""
    try:
        check_folder(path, what, shown)
    except SdfastError as exc:
        raise error(str(exc)) from None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise error(f"{what} {os.fspath(path if shown is None else shown)}: cannot create "
                    f"the folder ({exc.strerror or exc})") from None


def text_writer(text):
    """A `write(tmp)` for write_atomic that writes `text` (UTF-8) and syncs it to disk."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return write


def publish_atomic(path, write, overwrite=False):
    """`write_atomic`, with the name taken meanwhile (no `overwrite`) as a one-line error: for
    outputs written at the end of a long run, whose name was checked free at its start."""
    try:
        return write_atomic(path, write, overwrite)
    except FileExistsError:
        raise SdfastError(f"{os.fspath(path)}: exists (it appeared during the run; pass "
                          "--overwrite to replace it)") from None


def write_atomic(path, write, overwrite=False):
    """`write(tmp)` a temporary file in `path`'s folder, then give it the name `path`: with
    `overwrite` by `os.replace` (an existing file is replaced whole, never truncated first),
    without it by a hard link that fails with FileExistsError rather than replace a file. A
    partial file never carries the name `path`; the temporary file is removed whatever
    happens. OSErrors propagate (the caller words them). Returns `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp creates 0600; honour the umask
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def save_atomic(tensors, path, metadata=None, overwrite=False):
    """Save a safetensors file via a temporary file and `os.replace`: an interrupted save leaves
    any previous file intact. Refuses an existing `path` unless `overwrite`; a file that cannot
    be written is an SdfastError naming it."""
    from safetensors.torch import save_file

    try:
        from safetensors import SafetensorError
    except ImportError:                                 # older safetensors
        SafetensorError = OSError

    path = os.fspath(path)
    exists = SdfastError(f"{path}: exists (refusing to overwrite it)")
    if os.path.exists(path) and not overwrite:
        raise exists
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    make_folder(os.path.dirname(os.path.abspath(path)), "cannot save", shown=path, error=WriteError)
    try:
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite)
    except FileExistsError:
        raise exists from None
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WriteError(f"{path}: cannot write ({reason})") from None
    return path


def save_checkpoint(path, unet, vae, text_encoder, family, prediction="eps", dtype=None,
                    metadata=None, overwrite=False):
    """Write a pipeline's models as an LDM single file that sdfast, A1111 and ComfyUI load."""
    meta = model_metadata(unet, family, prediction)
    meta.update(metadata or {})
    sd = ldm_state_dict(unet, vae, text_encoder, family, dtype=dtype)
    return save_atomic(sd, path, metadata=meta, overwrite=overwrite)


__all__ = ["ldm_state_dict", "model_metadata", "save_atomic", "save_checkpoint", "write_atomic"]
