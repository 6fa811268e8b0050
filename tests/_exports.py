"""Exports shared by the export tests: one per process and configuration (exporting costs
seconds), in a temporary folder removed at exit."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

_ROOT = Path(tempfile.mkdtemp(prefix="sdfast-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def builtin_export(dtype="fp32", external_data_threshold=None):
    """The built-in model exported to ONNX (`external_data_threshold`: bytes, None = default)."""
    from sdfast.export import export_onnx

    out = _ROOT / f"builtin-{dtype}-{external_data_threshold}"
    kwargs = {} if external_data_threshold is None else {"external_data_threshold": external_data_threshold}
    export_onnx(None, out, dtype=dtype, **kwargs)
    return out


def relative_error(out, ref):
    """max |out - ref| / max |ref| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def unet_inputs(config, batch, height, width, tokens, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    t = torch.tensor([999.0, 500.0, 20.0, 1.5][:batch])
    ctx = torch.randn(batch, tokens, config.context_dim, generator=gen)
    return x.to(dtype), t, ctx.to(dtype)
