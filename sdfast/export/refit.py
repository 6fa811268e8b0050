"""LoRA on exported graphs: the torch runtime's own merge, handed to the graphs by name.

An exported stage keeps a *twin*: sdfast's torch model built on the meta device, whose
parameter names and shapes are what `sdfast.addons.lora.read_lora` resolves a LoRA file
against. A parameter becomes real (read from the graph's initializer, or the engine folder's
weights file) the first time a LoRA touches it. `RefitStack` is `sdfast.addons.lora.LoraStack`
itself -- the same `original + sum of active LoRAs` recomputation through `sdfast.ops.lora_merge_`
-- plus one step: after each refresh, the weights it recomputed are sent to the stage's runner
under their initializer names (the manifest's `refit` map). A weight that no LoRA touches any
more is sent back as the base tensor (`is_base=True`): ONNX Runtime then drops its override and
reads the file's initializer again, TensorRT refits the base values. Nothing is ever
subtracted, so unloading returns the base weights bit for bit, and A then B never blends.
"""
import torch

from ..addons.lora import LoraStack


def replace_parameter(module, name, tensor):
    """Swap the parameter `name` of `module` for `tensor` (frozen); returns the new parameter.
    (A meta parameter's `.data` cannot be set to a real tensor.)"""
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    param = torch.nn.Parameter(tensor, requires_grad=False)
    target._parameters[leaf] = param
    return param


class RefitStack(LoraStack):
    """`LoraStack` over exported stages (`components`: {"unet": stage, "text_encoder": stage},
    each with `.twin`, `.materialize(names)` and `.apply(changes)`)."""

    def __init__(self, components):
        self._stages = components
        super().__init__({name: stage.twin for name, stage in components.items()})

    def _materialize(self, keys):
        for component in {c for c, _ in keys}:
            stage = self._stages[component]
            names = [p for c, p in keys if c == component]
            stage.materialize(names, lora=True)
            params = dict(stage.twin.named_parameters())
            for name in names:
                self._params[component][name] = params[name]

    def add(self, loaded):
        self._materialize(self.touched(loaded))
        super().add(loaded)

    @torch.no_grad()
    def refresh(self, keys):
        super().refresh(keys)
        for component in sorted({c for c, _ in keys}):
            changes = {param: (self._weight((component, param)).data,
                               (component, param) not in self._originals)
                       for c, param in keys if c == component}
            self._stages[component].apply(changes)

    def weights(self):
        """`{component: {parameter: tensor}}` of every weight a LoRA currently changes."""
        out = {}
        for component, param in sorted(self._originals):
            out.setdefault(component, {})[param] = self._weight((component, param)).data
        return out


__all__ = ["RefitStack", "replace_parameter"]
