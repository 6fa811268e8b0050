"""The ONNX Runtime backend: `sdfast.load(DIR, backend="onnxruntime")`.

Each graph runs in an `InferenceSession` (the CUDA execution provider where it is present and
the device allows, else the CPU's). LoRA weights reach a graph as initializer replacements
(`SessionOptions.add_external_initializers`, which swaps the external initializers of those names
before the graph is optimised; `add_initializer` does not replace an initializer the file
holds): a LoRA change opens a new session with the current replacements; weights back at their
base value are replaced no more, so the session reads the file's own bytes again.
"""
import os

import torch

from ..errors import SdfastError
from . import manifest as mf
from .runtime import build_pipeline


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise SdfastError("onnxruntime is not installed (pip install 'sdfast[export]')") from None
    return onnxruntime


def providers_for(device):
    """ONNX Runtime providers for `device` (None: CUDA when the CUDA provider is present)."""
    available = _ort().get_available_providers()
    kind = None if device is None else torch.device(device).type
    if kind not in (None, "cpu", "cuda"):
        raise SdfastError(f"the onnxruntime backend runs on cpu or cuda, not {device!r}")
    if kind == "cuda" and "CUDAExecutionProvider" not in available:
        raise SdfastError("device cuda needs onnxruntime's CUDAExecutionProvider (pip install "
                          f"onnxruntime-gpu); available here: {', '.join(available)}")
    if kind != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """One graph in an InferenceSession, with LoRA initializer overrides."""

    def __init__(self, path, providers, threads=None):
        self.path = path
        self.providers = providers
        self.threads = threads
        self._overrides = {}             # initializer name -> numpy array (kept alive)
        self.session = self._open()

    def _open(self):
        ort = _ort()
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._overrides.values()]
        if values:
            options.add_external_initializers(list(self._overrides), values)
        try:
            session = ort.InferenceSession(self.path, options, providers=self.providers)
        except Exception as exc:     # onnxruntime raises its own exception types
            raise SdfastError(f"{self.path}: onnxruntime cannot open this graph "
                              f"({str(exc).splitlines()[0]})") from None
        return session

    def run(self, feeds):
        arrays = {name: value.detach().cpu().numpy() for name, value in feeds.items()}
        return [torch.from_numpy(out) for out in self.session.run(None, arrays)]

    def set_weights(self, changes):
        for name, (tensor, is_base) in changes.items():
            if is_base:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = tensor.detach().cpu().contiguous().numpy()
        self.session = self._open()


class OnnxInitializers:
    """Reads named initializers of an ONNX file (embedded or external data) as torch tensors."""

    def __init__(self, path):
        self.path = path

    def read(self, names):
        import onnx
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        wanted = set(names)
        model = onnx.load(self.path, load_external_data=False)
        out = {}
        for tensor in model.graph.initializer:
            if tensor.name in wanted:
                if uses_external_data(tensor):
                    load_external_data_for_tensor(tensor, os.path.dirname(self.path))
                out[tensor.name] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
        return out


def open_onnx(folder, device=None, prediction=None, threads=None):
    """The `ExportedPipeline` of an ONNX export folder on ONNX Runtime."""
    folder = os.fspath(folder)
    manifest = mf.read(folder, "sdfast-onnx")
    providers = providers_for(device)
    graphs = manifest["graphs"]

    def path_of(key):
        spec = graphs[key] if key in graphs else manifest["controlnets"][key.split("/", 1)[1]]
        path = os.path.join(folder, spec["file"])
        if not os.path.isfile(path):
            raise SdfastError(f"{path}: missing (the export folder is incomplete)")
        return path

    def make_runner(key, spec):
        return OrtRunner(path_of(key), providers, threads)

    def weights(stage):
        return OnnxInitializers(path_of(stage))

    return build_pipeline(folder, manifest, make_runner, weights, torch.device("cpu"),
                          "onnxruntime", prediction)


__all__ = ["OrtRunner", "OnnxInitializers", "open_onnx", "providers_for"]
