"""The sides of a comparison: sdfast and every baseline, behind one small interface.

A runtime loads a model and runs what the suites time: one UNet call, a full `generate`, LoRA
load + merge and swap, and a pass over every weight. The registry `RUNTIMES` maps
`--compare` names to classes; a runtime that cannot run here says why (`unavailable`), and the
suites report that reason instead of a figure. Adding a baseline is a subclass and one entry:
`OnnxRuntime` below is the sdfast API with `backend="onnxruntime"` on an exported folder.

This module imports nothing heavy: the load suite's child process imports it before it starts
its clock, so torch and the libraries are imported inside the methods that are timed.
"""
import importlib.util
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass


@dataclass
class ModelFiles:
    """The model a run times (see `sdfast.bench.arch`)."""

    checkpoint: str            # LDM single file, or a diffusers folder (--model)
    config_dir: str | None     # diffusers component configs for from_single_file (None: folder)
    label: str
    family: str
    prediction: str

    @property
    def key(self):
        """A name for files derived from this model (its folder and file name)."""
        path = os.path.abspath(self.checkpoint)
        return f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"


@dataclass
class Request:
    """One `generate`: the same for every runtime (noise included)."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg: float
    batch: int
    seed: int
    cache_interval: int = 1    # sdfast's step caching (1: off)
    cache_depth: int | None = None

    def noise(self):
        import torch

        gen = torch.Generator("cpu").manual_seed(self.seed)
        return torch.randn(self.batch, 4, self.height // 8, self.width // 8, generator=gen)


class SdfastRuntime:
    """sdfast itself, with the ops' automatic backend choice."""

    name = "sdfast"
    load_kwargs = {}

    def unavailable(self, device):
        return None

    def prepare(self, model, work_dir, dtype):
        """The path `load` reads (a baseline may convert the model first)."""
        return model.checkpoint

    def ops_context(self):
        return nullcontext()

    def imports(self):
        import torch  # noqa: F401

        import sdfast  # noqa: F401

    def load(self, model, path, device, dtype):
        import sdfast

        return sdfast.load(path, device=device, dtype=dtype, prediction=model.prediction,
                           **self.load_kwargs)

    def weights(self, pipe):
        return [pipe.unet, pipe.vae, pipe.text_encoder]

    def unet(self, pipe, x, t, ctx):
        with self.ops_context():
            return pipe.unet(x, t, ctx)

    def text(self, pipe, ids):
        with self.ops_context():
            return pipe.text_encoder(ids)

    def generate(self, pipe, req):
        cache = {} if req.cache_interval == 1 else {"cache_interval": req.cache_interval,
                                                     "cache_depth": req.cache_depth}
        with self.ops_context():
            return pipe.generate(req.prompt, req.negative, width=req.width, height=req.height,
                                 steps=req.steps, cfg=req.cfg, sampler="euler",
                                 scheduler="normal", noise=req.noise(), batch_size=req.batch,
                                 output="pil", progress=False, **cache)

    # LoRA: "A" and "B" are the two files of the suite.
    def lora_load(self, pipe, path, name):
        with self.ops_context():
            pipe.load_lora(path, name=name)

    def lora_swap_setup(self, pipe, a_path, b_path):
        """A merged, B's file already read (as when a user switches between known LoRAs)."""
        self.lora_load(pipe, b_path, "B")
        pipe.unload_lora("B")
        self.lora_load(pipe, a_path, "A")

    def lora_swap(self, pipe, b_path):
        with self.ops_context():
            pipe.unload_lora("A")
            pipe.load_lora(b_path, name="B")

    def lora_reset(self, pipe):
        """Nothing loaded, and no memory kept from it: the next load is a first load."""
        for name in list(pipe.loras):
            pipe.unload_lora(name)
        pipe.release_lora_buffers()


class TorchReferenceRuntime(SdfastRuntime):
    """sdfast with every op forced to its pure-torch reference backend: what sdfast's own
    kernels add, on the same models."""

    name = "torch-reference"

    def ops_context(self):
        from sdfast import ops

        return ops.use_backend("reference")


class DiffusersRuntime:
    """diffusers' StableDiffusionPipeline (eager), from the same single file."""

    name = "diffusers"

    def unavailable(self, device):
        for module in ("diffusers", "transformers"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install 'sdfast[test]')"
        return None

    def prepare(self, model, work_dir, dtype):
        return model.checkpoint

    def imports(self):
        import torch  # noqa: F401
        from diffusers import StableDiffusionPipeline  # noqa: F401

    def load(self, model, path, device, dtype):
        from diffusers import StableDiffusionPipeline

        _quiet()
        common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                      local_files_only=True)
        if model.config_dir is None:
            pipe = StableDiffusionPipeline.from_pretrained(path, **common)
        else:
            pipe = StableDiffusionPipeline.from_single_file(path, config=model.config_dir, **common)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def weights(self, pipe):
        return [pipe.unet, pipe.vae, pipe.text_encoder]

    def unet(self, pipe, x, t, ctx):
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample

    def text(self, pipe, ids):
        return pipe.text_encoder(ids)[0]

    def generate(self, pipe, req):
        device = pipe.unet.device
        return pipe(req.prompt, negative_prompt=req.negative, height=req.height,
                    width=req.width, num_inference_steps=req.steps, guidance_scale=req.cfg,
                    num_images_per_prompt=req.batch, output_type="pil",
                    latents=req.noise().to(device, pipe.unet.dtype)).images

    def lora_load(self, pipe, path, name):
        pipe.load_lora_weights(path, adapter_name=name)
        pipe.fuse_lora(adapter_names=[name])

    def lora_swap_setup(self, pipe, a_path, b_path):
        pipe.load_lora_weights(a_path, adapter_name="A")
        with warnings.catch_warnings():         # PEFT warns that a second adapter is added
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(b_path, adapter_name="B")
        pipe.set_adapters(["A"])
        pipe.fuse_lora(adapter_names=["A"])

    def lora_swap(self, pipe, b_path):
        pipe.unfuse_lora()
        pipe.set_adapters(["B"])
        pipe.fuse_lora(adapter_names=["B"])

    def lora_reset(self, pipe):
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


class DiffusersAcceleratedRuntime(DiffusersRuntime):
    """The same diffusers pipeline with sdfast's ops swapped into its modules by
    `sdfast.accelerate(pipe)` (fused GroupNorm+SiLU, attention): what a diffusers user gains
    without changing their code."""

    name = "diffusers-accelerated"

    def imports(self):
        super().imports()
        import sdfast  # noqa: F401

    def load(self, model, path, device, dtype):
        import sdfast

        pipe = super().load(model, path, device, dtype)
        sdfast.accelerate(pipe)
        return pipe


def _quiet():
    """No progress bars or load reports from diffusers / transformers in the timings' output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


class OnnxRuntime(SdfastRuntime):
    """sdfast's generate API on ONNX Runtime (`sdfast.export`, issue 7): the model is exported
    once per dtype into the work folder and opened with as many intra-op threads as torch uses."""

    name = "onnxruntime"
    _DTYPES = {"float32": "fp32", "float16": "fp16"}

    def unavailable(self, device):
        for module, why in (("onnxruntime", "onnxruntime is not installed"),
                            ("sdfast.export", "sdfast.export (ONNX export, issue 7) is not in "
                                              "this build")):
            if importlib.util.find_spec(module) is None:
                return why
        if str(device).startswith("cuda"):
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "this onnxruntime has no CUDA execution provider"
        return None

    def prepare(self, model, work_dir, dtype):
        from sdfast.export import export_onnx
        from sdfast.export.manifest import MANIFEST

        name = self._DTYPES.get(str(dtype).replace("torch.", ""))
        if name is None:
            raise RuntimeError(f"sdfast export onnx has no {dtype} graphs (fp32 or fp16)")
        out = os.path.join(work_dir, "onnx", f"{model.key}-{name}")
        if not os.path.exists(os.path.join(out, MANIFEST)):
            export_onnx(model.checkpoint, out, dtype=name, overwrite=True)
        return out

    def imports(self):
        import torch  # noqa: F401

        import sdfast.export.ort  # noqa: F401

    def load(self, model, path, device, dtype):
        import torch
        from sdfast.export.ort import open_onnx

        return open_onnx(path, device=device, prediction=model.prediction,
                         threads=torch.get_num_threads())

    def weights(self, pipe):
        return []                   # the weights live in ONNX Runtime's sessions


RUNTIMES = {cls.name: cls for cls in (SdfastRuntime, DiffusersRuntime, DiffusersAcceleratedRuntime,
                                      TorchReferenceRuntime, OnnxRuntime)}
BASELINES = tuple(name for name in RUNTIMES if name != "sdfast")
