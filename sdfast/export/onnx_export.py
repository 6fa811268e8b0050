"""`sdfast export onnx`: the text encoder, UNet, VAE decoder and encoder (and ControlNets) of a
model as ONNX graphs with dynamic batch, size and sequence, plus `manifest.json`.

How the custom ops get into ONNX: sdfast's models call `sdfast.ops`, whose fused ops are
torch.library custom ops (opaque `sdfast::` nodes to a tracer). While torch.onnx traces,
`sdfast.ops` runs each op's pure-torch reference inline instead (see sdfast/ops/__init__.py),
so the graph holds standard ONNX operators computing the reference, the definition of correct.
The TorchScript exporter is used (torch.export's exporter specialises sizes 0 and 1, and the
built-in model at its native 64 px reaches a 1x1 bottom level, so one graph could not cover it).

Constant folding is off so every parameter stays an initializer under its own name (folding
would fold nn.Linear weights into transposed, renamed copies): `refit` maps in the manifest
then name, for each weight a LoRA can change, the initializer that holds it; ONNX Runtime and
TensorRT fold the remaining weight transposes themselves when they load the graph. The UNet
and the text encoder, the graphs a LoRA changes, always keep their weights in external data
(`<stage>.onnx.data`): ONNX Runtime replaces initializers at session creation only where they
are external (`add_external_initializers`); the other graphs do so past 2 GB.
"""
import os
import shutil
import tempfile
import warnings

import torch

from ..errors import SdfastError
from . import manifest as mf
from .graphs import (ControlNetGraph, TextEncoderGraph, UNetGraph, VAEDecoderGraph,
                     VAEEncoderGraph, residual_specs)

MIN_OPSET = 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PROTOBUF_LIMIT = 2 ** 31 - 2 ** 24       # a model beyond ~2 GB must keep its weights outside
STAGES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REFIT_STAGES = ("unet", "text_encoder")
STAGING_PREFIX = ".export-staging-"


def max_opset():
    from torch.onnx import _constants

    return _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def check_options(opset, dtype):
    top = max_opset()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise SdfastError(f"opset must be an integer from {MIN_OPSET} to {top}, got {opset!r}")
    if dtype not in DTYPES:
        raise SdfastError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise SdfastError("onnx is not installed (pip install 'sdfast[export]')") from None


def _controlnet_names(paths):
    """`{graph name: path}` of the ControlNets to export (each path checked)."""
    names = {}
    for path in (os.fspath(p) for p in paths):
        if not os.path.exists(path):
            raise SdfastError(f"{path}: no such ControlNet file or folder")
        names[_controlnet_name(path, names)] = path
    return names


def _load_controlnets(names, unet, dtype):
    """Load each ControlNet, checked against the UNet as `generate` checks it."""
    import sdfast
    from ..addons.controlnet import Control, prepare_controls

    nets = {}
    for name, path in names.items():
        net = sdfast.load_controlnet(path, device="cpu", dtype=dtype)
        prepare_controls(Control(net, torch.zeros(1, 3, 8, 8)), unet, 8, 8, "cpu", dtype)
        nets[name] = net
    return nets


def _controlnet_name(path, taken):
    """The ControlNet's file or folder name, made unique among `taken`."""
    base = os.path.splitext(os.path.basename(os.path.normpath(os.fspath(path))))[0] or "controlnet"
    name, index = base, 2
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name


def export_onnx(model=None, output=None, opset=MIN_OPSET, dtype="fp32", controlnets=(),
                control_inputs=None, overwrite=False, external_data_threshold=PROTOBUF_LIMIT):
    """Export `model` (a checkpoint path, a diffusers folder, None for the built-in model) to
    the folder `output`. Returns the manifest.

    `dtype` "fp16" exports the UNet and ControlNets in fp16 and keeps the VAE in fp32 (the SD
    VAE overflows in fp16; A1111's --no-half-vae) and the text encoder too (~1% of the run
    time; the TorchScript exporter builds its causal attention mask in fp32, which ONNX's fp16
    LayerNormalization then rejects). `controlnets`: ControlNet files
    or folders, each written as its own graph; the UNet then takes the residual inputs, as it
    also does with `control_inputs=True`. A graph whose weights exceed
    `external_data_threshold` bytes keeps them in `<stage>.onnx.data` beside it.

    The graphs are written into a hidden staging folder inside `output` and moved into place
    only once all of them are written, the manifest (atomically) last: an export stopped
    midway leaves an existing export as it was.
    """
    import sdfast

    check_options(opset, dtype)
    _require_onnx()
    if output is None:
        raise SdfastError("an output folder is required")
    output = os.fspath(output)
    names = _controlnet_names(controlnets)
    files = {stage: f"{stage}.onnx" for stage in STAGES}
    files.update({f"controlnet/{name}": f"controlnet_{name}.onnx" for name in names})
    _check_free(output, files.values(), overwrite)
    torch_dtype = DTYPES[dtype]
    pipe = sdfast.load(model, device="cpu", dtype=torch_dtype)
    nets = _load_controlnets(names, pipe.unet, torch_dtype)
    with_controls = bool(nets) if control_inputs is None else bool(control_inputs)
    if nets and not with_controls:
        raise SdfastError("ControlNets need the UNet's residual inputs (control_inputs=False given)")

    vae, text_encoder = pipe.vae.float(), pipe.text_encoder.float()     # see the docstring
    graphs = {"text_encoder": TextEncoderGraph(text_encoder),
              "unet": UNetGraph(pipe.unet, control_inputs=with_controls),
              "vae_decoder": VAEDecoderGraph(vae), "vae_encoder": VAEEncoderGraph(vae)}
    for name, net in nets.items():
        graphs[f"controlnet/{name}"] = ControlNetGraph(net)

    mf.make_folder(output)
    # Every graph is written into a staging folder inside `output` first; only when all are
    # written and checked do they replace the old export's files (see `_publish`).
    staging = tempfile.mkdtemp(dir=output, prefix=STAGING_PREFIX)
    try:
        written = {}
        for stage, graph in graphs.items():
            fp16_ok = stage == "unet" or stage.startswith("controlnet")
            graph_dtype = torch_dtype if fp16_ok else torch.float32
            threshold = 0 if stage in REFIT_STAGES else external_data_threshold
            written[stage] = _export_graph(graph, graph_dtype, os.path.join(staging, files[stage]),
                                           opset, threshold)
        refit = {stage: _refit_map(getattr(graphs[stage], stage), written[stage]["initializers"],
                                   stage + ".")
                 for stage in REFIT_STAGES}
        manifest = _manifest(pipe, opset, dtype, files, written, refit, nets, with_controls)
        _publish(staging, output, files, written, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _publish(staging, output, files, written, manifest):
    """Move the finished graphs from `staging` into `output`, then write the manifest.

    The old export stays whole until every new graph is written. Its manifest goes first, so
    during the moves (renames, no copying) the folder holds no manifest and no backend loads a
    mix of old and new graphs; the new manifest, written atomically, comes last."""
    old_manifest = os.path.join(output, mf.MANIFEST)
    if os.path.lexists(old_manifest):
        os.remove(old_manifest)
    for stage, name in files.items():
        data = name + ".data"
        os.replace(os.path.join(staging, name), os.path.join(output, name))
        if written[stage]["external_data"]:
            os.replace(os.path.join(staging, data), os.path.join(output, data))
        elif os.path.lexists(os.path.join(output, data)):
            os.remove(os.path.join(output, data))          # the old graph's, now stale
    mf.write(output, manifest)


def _check_free(output, names, overwrite):
    mf.check_folder(output)
    if overwrite or not os.path.isdir(output):
        return
    names = [mf.MANIFEST, *names, *(n + ".data" for n in names)]
    taken = [n for n in names if os.path.exists(os.path.join(output, n))]
    if taken:
        raise SdfastError(f"{os.path.join(output, taken[0])} exists (pass --overwrite to replace "
                          "the export)")


def _export_graph(graph, dtype, path, opset, threshold):
    """Trace `graph` into `path` (weights in external data past `threshold` bytes; 0: every
    initializer external), check it, and return
    `{"inputs", "outputs", "initializers", "external_data"}`."""
    import onnx

    folder = os.path.dirname(path)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        traced = os.path.join(tmp, "graph.onnx")
        with warnings.catch_warnings():
            # The models' argument checks read sizes as Python values: constants in the trace,
            # which is what they are (the checks hold for every shape the graph accepts).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
            # The TorchScript exporter is chosen on purpose (module docstring).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            with torch.no_grad():
                torch.onnx.export(graph.eval(), graph.example(dtype), traced, dynamo=False,
                                  opset_version=opset, input_names=list(graph.input_names),
                                  output_names=list(graph.output_names),
                                  dynamic_axes=graph.dynamic_axes, do_constant_folding=False)
        model = onnx.load(traced)                       # external pieces, if any, read back in
    weights = sum(_nbytes(t) for t in model.graph.initializer)
    external = weights > threshold or threshold == 0
    data_name = os.path.basename(path) + ".data"
    for stale in (path, os.path.join(folder, data_name)):
        if os.path.exists(stale):
            os.remove(stale)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024 if threshold else 0)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(path)
    return {"inputs": _values(model.graph.input), "outputs": _values(model.graph.output),
            "initializers": {t.name: list(t.dims) for t in model.graph.initializer},
            "external_data": data_name if external else None}


def _nbytes(tensor):
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _values(values):
    """`{name: {"shape": [int | symbol], "dtype": numpy name}}` of graph inputs/outputs."""
    import numpy as np
    from onnx import helper

    out = {}
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out[v.name] = {"shape": shape,
                       "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name}
    return out


def _refit_map(module, initializers, prefix):
    """`{parameter name: initializer name}` for the parameters stored in the graph under their
    own name (after the wrapper's attribute, `prefix`) and shape: with constant folding off,
    every parameter the graph uses."""
    return {name: prefix + name for name, p in module.named_parameters()
            if list(p.shape) == initializers.get(prefix + name)}


def _manifest(pipe, opset, dtype, files, written, refit, nets, with_controls):
    import sdfast
    from ..pipeline import VAE_SCALE

    info = pipe._info
    graphs = {}
    for stage in STAGES:
        entry = {key: written[stage][key] for key in ("inputs", "outputs", "external_data")}
        graphs[stage] = {"file": files[stage], **entry}
        if stage in refit:
            graphs[stage]["refit"] = refit[stage]
    controlnets = {}
    for name, net in nets.items():
        stage = f"controlnet/{name}"
        controlnets[name] = {"file": files[stage], "source": net.source,
                             "config": mf.config_dict(net.config),
                             **{k: written[stage][k] for k in ("inputs", "outputs", "external_data")}}
    return {
        "format": "sdfast-onnx", "version": mf.VERSION, "sdfast_version": sdfast.__version__,
        "opset": opset, "dtype": dtype, "family": info.family, "prediction": info.prediction,
        "inpaint": info.inpaint, "vae_scale": VAE_SCALE, "native_size": list(pipe.native_size),
        "source": pipe.source, "model_hash": pipe.model_hash,
        "metadata": {str(k): str(v) for k, v in pipe.metadata.items()},
        "configs": {"unet": mf.config_dict(pipe.unet.config), "vae": mf.config_dict(pipe.vae.config),
                    "text_encoder": mf.config_dict(pipe.text_encoder.config)},
        "graphs": graphs, "controlnets": controlnets,
        "residuals": [list(r) for r in residual_specs(pipe.unet.config)] if with_controls else [],
    }


__all__ = ["export_onnx", "check_options", "MIN_OPSET", "DTYPES", "STAGES", "max_opset"]
