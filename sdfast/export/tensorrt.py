"""TensorRT engines from an ONNX export, and the TensorRT backend.

`build_engines(onnx_dir, output, shapes, fp16, refit)` parses each graph of an ONNX export
(`OnnxParser.parse_from_file`, which reads external data), builds one engine per stage with one
optimisation profile (`sdfast.export.profiles`), shares a timing cache across the stages
(`timing.cache`, reused by later builds) and writes `manifest.json` (format "sdfast-tensorrt":
the ONNX manifest plus each engine's profile). With `refit`, the UNet and text encoder engines
are refittable and the base values of their refittable weights are kept beside them
(`<stage>.weights.safetensors`, initializer names; the manifest's `fixed` lists the weights the
engine cannot refit), so a LoRA change always refits from the base: A then B never blends.

`open_engines(folder)` gives sdfast's Pipeline over the engines (`TrtRunner`, CUDA tensors in
and out, every request checked against the profile first).

TensorRT 10 API (tensor-name I/O, `execute_async_v3`, `Refitter.set_named_weights`).
"""
import os

import torch

from ..errors import SdfastError
from . import manifest as mf
from .profiles import ProfileChecked, compute_profiles
from .runtime import build_pipeline

REFIT_STAGES = ("unet", "text_encoder")
TIMING_CACHE = "timing.cache"


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise SdfastError("tensorrt is not installed (pip install tensorrt, on a machine with "
                          "an NVIDIA GPU)") from None
    return tensorrt


def engine_file(stage):
    return stage.replace("/", "_") + ".engine"


def weights_file(stage):
    return f"{stage}.weights.safetensors"


def build_engines(onnx_dir, output, shapes, fp16=False, refit=False, overwrite=False):
    """Build the engines of the ONNX export `onnx_dir` into `output` for `shapes`
    (`profiles.BuildShapes`). Returns the engines' manifest."""
    onnx_dir, output = os.fspath(onnx_dir), os.fspath(output)
    check_output(onnx_dir, output)
    manifest = mf.read(onnx_dir, "sdfast-onnx")
    profiles = compute_profiles(manifest, shapes)
    _check_free(output, profiles, overwrite)
    trt = _trt()
    mf.make_folder(output)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = os.path.join(output, TIMING_CACHE)
    cache = b""
    if os.path.isfile(cache_path):
        with open(cache_path, "rb") as fh:
            cache = fh.read()
    engines = {}
    for stage, profile in profiles.items():
        spec = _spec(manifest, stage)
        refittable = refit and stage in REFIT_STAGES
        data, cache = _build_one(trt, builder, logger, os.path.join(onnx_dir, spec["file"]),
                                 profile, fp16, refittable, cache)
        with open(os.path.join(output, engine_file(stage)), "wb") as fh:
            fh.write(data)
        engines[stage] = {"file": engine_file(stage), "refit": refittable,
                          "profile": {k: [list(s) for s in v] for k, v in profile.items()}}
    with open(cache_path, "wb") as fh:
        fh.write(cache)
    out = {**manifest, "format": "sdfast-tensorrt", "onnx": os.path.abspath(onnx_dir),
           "engines": engines, "tensorrt": trt.__version__,
           "build": {"min": list(shapes.min_size), "opt": list(shapes.opt_size),
                     "max": list(shapes.max_size), "batch": list(shapes.batch),
                     "max_chunks": shapes.max_chunks, "fp16": bool(fp16), "refit": bool(refit),
                     "describe": shapes.describe()}}
    for stage in REFIT_STAGES:
        graph = out["graphs"][stage]
        refittable = set()
        if refit:
            engine = _deserialize(trt, logger, os.path.join(output, engine_file(stage)))
            refittable = set(trt.Refitter(engine, logger).get_all_weights())
        graph["fixed"] = sorted(p for p, n in graph["refit"].items() if n not in refittable)
        _save_weights(os.path.join(onnx_dir, graph["file"]), os.path.join(output, weights_file(stage)),
                      [n for p, n in graph["refit"].items()
                       if n in refittable or p.endswith("token_embedding.weight")])
    mf.write(output, out)
    return out


def _spec(manifest, stage):
    if stage.startswith("controlnet/"):
        return manifest["controlnets"][stage.split("/", 1)[1]]
    return manifest["graphs"][stage]


def check_output(onnx_dir, output):
    """Refuse, before TensorRT is imported or anything is built, an output folder that is the
    ONNX export itself (the engines' manifest.json would replace the export's, even with
    --overwrite) or that cannot be used as a folder (a file, under a file, not writable)."""
    onnx_dir, output = os.fspath(onnx_dir), os.fspath(output)
    if os.path.realpath(output) == os.path.realpath(onnx_dir):
        raise SdfastError(f"-o {output} is the ONNX export folder (--onnx {onnx_dir}): the "
                          "engines' manifest.json would replace the export's; choose another "
                          "output folder")
    mf.check_folder(output)


def _check_free(output, profiles, overwrite):
    if overwrite or not os.path.isdir(output):
        return
    names = [mf.MANIFEST, *(engine_file(s) for s in profiles), *(weights_file(s) for s in REFIT_STAGES)]
    taken = [n for n in names if os.path.exists(os.path.join(output, n))]
    if taken:
        raise SdfastError(f"{os.path.join(output, taken[0])} exists (pass --overwrite to replace "
                          "the engines)")


def _build_one(trt, builder, logger, onnx_path, profile, fp16, refit, cache):
    """`(serialized engine bytes, timing cache bytes)` for one ONNX graph."""
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:           # explicit batch is the only mode in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SdfastError(f"{onnx_path}: TensorRT cannot parse this graph ({errors})")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    timing = config.create_timing_cache(cache)
    config.set_timing_cache(timing, False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, tuple(lo), tuple(mid), tuple(hi))
    config.add_optimization_profile(opt)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise SdfastError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    return bytes(data), bytes(config.get_timing_cache().serialize())


def _save_weights(onnx_path, out_path, names):
    """Keep the base values of `names` (initializers) beside the engines: the weights the
    engine can refit (LoRA always refits from these) and the token embedding table (textual
    inversion looks rows up in it)."""
    from safetensors.torch import save_file

    from .ort import OnnxInitializers

    tensors = OnnxInitializers(onnx_path).read(names)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)


def _deserialize(trt, logger, path):
    with open(path, "rb") as fh:
        engine = trt.Runtime(logger).deserialize_cuda_engine(fh.read())
    if engine is None:
        raise SdfastError(f"{path}: TensorRT cannot load this engine (built by another TensorRT "
                          "version or GPU?)")
    return engine


class TrtRunner:
    """One engine: CUDA tensors in, CUDA tensors out, on torch's current stream."""

    def __init__(self, trt, logger, path):
        self.trt = trt
        self.logger = logger
        self.path = path
        self.engine = _deserialize(trt, logger, path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def _dtype(self, name):
        return {self.trt.float32: torch.float32, self.trt.float16: torch.float16,
                self.trt.int64: torch.int64, self.trt.int32: torch.int32,
                self.trt.bool: torch.bool}[self.engine.get_tensor_dtype(name)]

    def run(self, feeds):
        keep = []
        for name in self.inputs:
            value = feeds[name].to("cuda", self._dtype(name)).contiguous()
            keep.append(value)
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise SdfastError(f"{self.path}: TensorRT failed to run the engine")
        return outs

    def set_weights(self, changes):
        """Refit: every changed weight, merged or back at its base value."""
        refitter = self.trt.Refitter(self.engine, self.logger)
        arrays = []                      # alive until the refit is done
        for name, (tensor, _) in changes.items():
            array = tensor.detach().cpu().contiguous().numpy()
            arrays.append(array)
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise SdfastError(f"{self.path}: the engine refuses refit weights {name!r} "
                                  "(build the engines with --refit)")
        missing = refitter.get_missing_weights()
        if missing:
            raise SdfastError(f"{self.path}: refit needs {len(missing)} more weights "
                              f"(first: {missing[0]})")
        if not refitter.refit_cuda_engine():
            raise SdfastError(f"{self.path}: TensorRT failed to refit the engine")


class SafetensorsWeights:
    """Base weights kept beside refittable engines, read by initializer name."""

    def __init__(self, path):
        self.path = path

    def read(self, names):
        from safetensors import safe_open

        if not os.path.isfile(self.path):
            raise SdfastError(f"{self.path}: missing; LoRA needs engines built with --refit")
        with safe_open(self.path, framework="pt") as fh:
            keys = set(fh.keys())
            return {n: fh.get_tensor(n) for n in names if n in keys}


def open_engines(folder, device=None, prediction=None):
    """The `ExportedPipeline` of a TensorRT engines folder (CUDA only)."""
    folder = os.fspath(folder)
    manifest = mf.read(folder, "sdfast-tensorrt")
    trt = _trt()
    if device is not None and torch.device(device).type != "cuda":
        raise SdfastError(f"the tensorrt backend runs on cuda, not {device!r}")
    if not torch.cuda.is_available():
        raise SdfastError("the tensorrt backend needs a CUDA device (torch sees none)")
    logger = trt.Logger(trt.Logger.WARNING)
    built = manifest["build"]["describe"]

    def make_runner(key, spec):
        engine = manifest["engines"][key]
        path = os.path.join(folder, engine["file"])
        if not os.path.isfile(path):
            raise SdfastError(f"{path}: missing (the engines folder is incomplete)")
        return ProfileChecked(TrtRunner(trt, logger, path), engine["profile"], path, built)

    def weights(stage):
        return SafetensorsWeights(os.path.join(folder, weights_file(stage)))

    return build_pipeline(folder, manifest, make_runner, weights, torch.device("cuda"),
                          "tensorrt", prediction)


__all__ = ["build_engines", "check_output", "open_engines", "TrtRunner", "SafetensorsWeights",
           "engine_file"]
