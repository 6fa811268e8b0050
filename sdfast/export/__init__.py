"""Export: ONNX graphs (`export_onnx`), an ONNX Runtime backend and TensorRT engines.

    sdfast export onnx --model CKPT -o DIR            # graphs + manifest.json
    pipe = sdfast.load(DIR, backend="onnxruntime")     # the same generate API
    sdfast export tensorrt --onnx DIR -o ENGINES       # engines with shape profiles
    pipe = sdfast.load(ENGINES, backend="tensorrt")

Modules: `graphs` (the traced stages, their names and dynamic axes), `onnx_export`,
`manifest`, `runtime` (the stages behind sdfast's own Pipeline), `refit` (LoRA through the
torch runtime's LoraStack, handed to the graphs by initializer name), `ort` (ONNX Runtime),
`profiles` (TensorRT shape profiles and their check, no TensorRT needed), `tensorrt`, `cli`.
"""


def export_onnx(*args, **kwargs):
    from .onnx_export import export_onnx as run

    return run(*args, **kwargs)


__all__ = ["export_onnx"]
