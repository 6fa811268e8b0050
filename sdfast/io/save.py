"""Writing LDM single-file checkpoints: the inverse of `detect.split_components`, saved atomically
(a temporary file in the same folder, then a rename), never replacing a file unless asked."""
import os


from ..errors import SdfastError
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


def save_atomic(tensors, path, metadata=None, overwrite=False):
    """Save a safetensors file via a temporary file and `os.replace`: an interrupted save leaves
    any previous file intact. Refuses an existing `path` unless `overwrite`."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise SdfastError(f"{path}: exists (refusing to overwrite it)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, 0o666 & ~_umask())      # safetensors creates 0600; honour the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(path, unet, vae, text_encoder, family, prediction="eps", dtype=None,
                    metadata=None, overwrite=False):
    """Write a pipeline's models as an LDM single file that sdfast, A1111 and ComfyUI load."""
    meta = model_metadata(unet, family, prediction)
    meta.update(metadata or {})
    sd = ldm_state_dict(unet, vae, text_encoder, family, dtype=dtype)
    return save_atomic(sd, path, metadata=meta, overwrite=overwrite)


__all__ = ["ldm_state_dict", "model_metadata", "save_atomic", "save_checkpoint"]
