"""Exported stages behind sdfast's own `Pipeline`: only the model calls change.

`ExportedPipeline` is `sdfast.pipeline.Pipeline` (prompt parsing, embeddings, samplers, seeds,
CFG, img2img, inpainting, ControlNet timing and modes, `<lora:...>` tags) whose UNet, VAE and
text encoder are stages: objects with the torch modules' call signatures that run a graph
through a *runner* (`sdfast.export.ort.OrtRunner`, `sdfast.export.tensorrt.TrtRunner`):

    runner.run({input name: tensor}) -> [output tensors]      (inputs cast to the graph's dtypes)
    runner.set_weights({initializer name: (tensor, is_base)})   (LoRA, sdfast.export.refit)

Each stage carries a meta-device twin of the torch model (names, shapes, configs and parameter
counts for the Pipeline and the LoRA reader); see sdfast.export.refit.
"""
import os

import torch

from ..errors import SdfastError
from ..pipeline import Pipeline
from . import manifest as mf
from .refit import RefitStack, replace_parameter

BACKENDS = ("onnxruntime", "tensorrt")


def _torch_dtype(name):
    return getattr(torch, name)


def _twin(cls, config, dtype):
    with torch.device("meta"):
        return cls(config).to(dtype).eval().requires_grad_(False)


class Stage:
    """One graph: its runner, its inputs' dtypes and (optionally) a twin and refit map."""

    def __init__(self, runner, spec, twin=None, refit=None, weights=None):
        self.name = os.path.basename(getattr(runner, "path", "") or "") or "graph"
        self.fixed = set(spec.get("fixed", ()))   # in the graph, but not refittable
        self.runner = runner
        self.inputs = {name: _torch_dtype(s["dtype"]) for name, s in spec["inputs"].items()}
        self.outputs = list(spec["outputs"])
        self.twin = twin
        self.config = getattr(twin, "config", None)
        self._refit = dict(refit or {})
        self._weights = weights

    def named_parameters(self, *args, **kwargs):
        return self.twin.named_parameters(*args, **kwargs)

    def parameters(self, *args, **kwargs):
        return self.twin.parameters(*args, **kwargs)

    def run(self, **feeds):
        return self.runner.run({name: value.to(self.inputs[name]) for name, value in feeds.items()})

    def materialize(self, names, lora=False):
        """Give the twin's parameters `names` their real values (the graph's initializers);
        `lora`: they are about to change, which an engine built without refit cannot do."""
        params = dict(self.twin.named_parameters())
        fixed = sorted(self.fixed.intersection(names))
        if lora and fixed:
            raise SdfastError(f"{self.name}: a LoRA changes {len(fixed)} weight(s) this engine "
                              f"cannot refit (first: {fixed[0]}); build the engines with --refit")
        todo = [n for n in names if params[n].is_meta]
        found = self._weights.read([self._refit[n] for n in todo if n in self._refit]) if todo else {}
        for name in todo:
            value = found.get(self._refit.get(name))
            if value is None:       # a weight the graph does not use (e.g. SD2's last text block):
                value = torch.zeros(params[name].shape, dtype=params[name].dtype)   # no effect
            replace_parameter(self.twin, name, value)

    def apply(self, changes):
        """Send recomputed weights (`{parameter: (tensor, is_base)}`) to the runner."""
        named = {self._refit[p]: v for p, v in changes.items() if p in self._refit}
        if named:
            self.runner.set_weights(named)


class TextEncoderStage(Stage):
    """`text_encoder(input_ids, clip_skip=1)` / `(inputs_embeds=..., clip_skip=...)`."""

    def __init__(self, runner, spec, twin, refit, weights):
        super().__init__(runner, spec, twin, refit, weights)
        cfg = twin.config
        self.blocks = cfg.layers - getattr(cfg, "skip_last_layers", 0)
        self._token_param = next(n for n, _ in twin.named_parameters() if n.endswith("token_embedding.weight"))

    @property
    def token_embedding(self):
        self.materialize([self._token_param])
        return self.twin.token_embedding

    def __call__(self, input_ids=None, clip_skip=1, inputs_embeds=None):
        from ..models.clip import _blocks_to_run

        _blocks_to_run(self.blocks, clip_skip)                  # the torch model's range check
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            n, t = input_ids.shape
            embeds = torch.zeros(n, t, self.config.width)
            mask = torch.zeros(n, t, dtype=torch.bool)
        else:
            n, t = inputs_embeds.shape[:2]
            input_ids = torch.zeros(n, t, dtype=torch.long)
            embeds, mask = inputs_embeds, torch.ones(n, t, dtype=torch.bool)
        return self.run(input_ids=input_ids, clip_skip=torch.tensor(clip_skip),
                        inputs_embeds=embeds, embeds_mask=mask)[0]


class UNetStage(Stage):
    """`unet(x, timesteps, context, control=None)`; feeds zero residuals to a graph with
    ControlNet inputs when no ControlNet acts on this step."""

    def __init__(self, runner, spec, twin, refit, weights, residuals):
        super().__init__(runner, spec, twin, refit, weights)
        self.control_inputs = [n for n in self.inputs if n.startswith("control_")]
        self.residuals = [tuple(r) for r in residuals]
        self._zeros = {}

    def _zero_residuals(self, x):
        from .graphs import _down

        key = (x.shape[0], x.shape[2], x.shape[3], x.device)
        if key not in self._zeros:
            dtype = self.inputs["sample"]
            self._zeros = {key: [torch.zeros(x.shape[0], c, _down(x.shape[2], d), _down(x.shape[3], d),
                                             dtype=dtype, device=x.device) for c, d in self.residuals]}
        return self._zeros[key]

    def __call__(self, x, timesteps, context, control=None):
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        feeds = {"sample": x, "timestep": timesteps, "context": context}
        if control is not None:
            if not self.control_inputs:
                raise SdfastError("this export's UNet has no ControlNet inputs (export with "
                                  "--controlnet, or control_inputs=True)")
            if len(control) != len(self.control_inputs):
                raise SdfastError(f"the UNet takes {len(self.control_inputs)} ControlNet residuals, "
                                  f"got {len(control)}")
            feeds.update(zip(self.control_inputs, control))
        elif self.control_inputs:
            feeds.update(zip(self.control_inputs, self._zero_residuals(x)))
        return self.run(**feeds)[0]


class VAEStage:
    """`vae.encode(image).mean` and `vae.decode(latent)` over the two VAE graphs."""

    def __init__(self, decoder, encoder, twin):
        self.decoder, self.encoder, self.twin = decoder, encoder, twin
        self.config = twin.config

    def parameters(self, *args, **kwargs):
        return self.twin.parameters(*args, **kwargs)

    def encode(self, image):
        from ..models.vae import DiagonalGaussian

        return DiagonalGaussian(self.encoder.run(image=image)[0])

    def decode(self, latent):
        return self.decoder.run(latent=latent)[0]


class ControlNetStage(Stage):
    """An exported ControlNet for `sdfast.Control(pipe.controlnets[name], image)`."""

    def __init__(self, runner, spec, config, source):
        super().__init__(runner, spec)
        self.config = config
        self.source = source

    def __call__(self, x, hint, timesteps, context):
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.run(sample=x, hint=hint, timestep=timesteps, context=context)


class ExportedPipeline(Pipeline):
    """sdfast's Pipeline over exported stages; `controlnets` holds the export's ControlNets."""

    def __init__(self, manifest, folder, stages, controlnets, device, dtype, backend, info):
        super().__init__(stages["unet"], stages["vae"], stages["text_encoder"], info, device,
                         dtype, source=os.fspath(folder), metadata=manifest.get("metadata"))
        self.manifest = manifest
        self.backend = backend
        self.controlnets = controlnets
        self.release_weights = False    # the stages hold no file-mapped torch weights

    @property
    def model_hash(self):
        return self.manifest.get("model_hash")

    def _stack(self):
        if self._lora_stack is None:
            self._lora_stack = RefitStack({"unet": self.unet, "text_encoder": self.text_encoder})
        return self._lora_stack

    def refit_weights(self):
        """`{stage: {initializer name: tensor}}`: the weights the loaded LoRAs change, under the
        graphs' initializer names (what a refit of the exported graphs applies)."""
        out = {}
        for component, weights in self._stack().weights().items():
            refit = self.manifest["graphs"][component]["refit"]
            out[component] = {refit[p]: t for p, t in weights.items() if p in refit}
        return out


def build_pipeline(folder, manifest, make_runner, weights, device, backend, prediction=None):
    """An `ExportedPipeline` for an export folder: `make_runner(key, spec)` opens the graph or
    engine of `key` ("unet", ..., "controlnet/<name>"), `weights(stage)` is the stage's weight
    source for LoRA (`.read(names) -> {name: tensor}`)."""
    from ..io.detect import PREDICTIONS, ModelInfo
    from ..models.unet import UNetModel
    from ..models.vae import AutoencoderKL

    if prediction is not None and prediction not in PREDICTIONS:
        raise SdfastError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    graphs = manifest["graphs"]
    dtype = _torch_dtype(graphs["unet"]["inputs"]["sample"]["dtype"])
    text_dtype = _torch_dtype(graphs["text_encoder"]["inputs"]["inputs_embeds"]["dtype"])
    text_cls, text_cfg = mf.text_config(manifest)
    vae_twin = _twin(AutoencoderKL, mf.vae_config(manifest["configs"]["vae"]), torch.float32)
    stages = {
        "unet": UNetStage(make_runner("unet", graphs["unet"]), graphs["unet"],
                          _twin(UNetModel, mf.unet_config(manifest["configs"]["unet"]), dtype),
                          graphs["unet"]["refit"], weights("unet"), manifest.get("residuals", [])),
        "text_encoder": TextEncoderStage(make_runner("text_encoder", graphs["text_encoder"]),
                                         graphs["text_encoder"], _twin(text_cls, text_cfg, text_dtype),
                                         graphs["text_encoder"]["refit"], weights("text_encoder")),
        "vae": VAEStage(Stage(make_runner("vae_decoder", graphs["vae_decoder"]), graphs["vae_decoder"]),
                        Stage(make_runner("vae_encoder", graphs["vae_encoder"]), graphs["vae_encoder"]),
                        vae_twin),
    }
    controlnets = {name: ControlNetStage(make_runner(f"controlnet/{name}", spec), spec,
                                         mf.controlnet_config(spec["config"]), spec.get("source"))
                   for name, spec in manifest.get("controlnets", {}).items()}
    info = ModelInfo(manifest["family"], prediction or manifest["prediction"],
                     bool(manifest["inpaint"]), "argument" if prediction else "manifest")
    return ExportedPipeline(manifest, folder, stages, controlnets, device, dtype, backend, info)


def load_exported(path, backend, device=None, dtype=None, prediction=None):
    """`sdfast.load(path, backend=...)` for an export folder."""
    if backend not in BACKENDS:
        raise SdfastError(f"unknown backend {backend!r}; backends: torch, {', '.join(BACKENDS)}")
    if path is None:
        raise SdfastError(f"backend {backend!r} loads an export folder: pass its path "
                          f"(sdfast export {'onnx' if backend == 'onnxruntime' else 'tensorrt'} ...)")
    if dtype is not None:
        raise SdfastError(f"backend {backend!r} runs the dtype the graphs were exported in; "
                          "do not pass dtype")
    if backend == "onnxruntime":
        from .ort import open_onnx

        return open_onnx(path, device=device, prediction=prediction)
    from .tensorrt import open_engines

    return open_engines(path, device=device, prediction=prediction)


__all__ = ["ExportedPipeline", "Stage", "UNetStage", "TextEncoderStage", "VAEStage",
           "ControlNetStage", "build_pipeline", "load_exported", "BACKENDS"]
