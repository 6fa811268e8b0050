"""CUDA graphs for the UNet: one captured graph per input signature, replayed every step.

`Pipeline.enable_cuda_graphs()` puts a `GraphedUNet` in front of the UNet. A call whose tensors
(shapes, dtypes, strides, device) and options (control residual count, step-cache depth and
branch) have been seen before copies its inputs into that graph's static buffers, replays
the graph and returns clones of its outputs; a new signature is first run eagerly a few
times on a side stream (warm-up: lazy initialisation, cuBLAS workspaces, Triton autotuning),
then captured. Sampling a 512x512 batch with CFG and a fixed step count thus captures one graph
(two with step caching: the whole UNet and the shallow branch).

A graph reads the weights at the addresses they had at capture, so whatever changes weights
must write them in place: enabling graphs switches the pipeline's LoRA merging to in place
(`Pipeline.lora_in_place`), which keeps every parameter's storage, and LoRA swaps then reach
the captured graphs exactly. Everything a graph computes must be capturable (no host
synchronisation inside the UNet); ControlNets run eagerly and their residuals are graph inputs.
"""
import torch

WARMUP_CALLS = 3


class GraphedUNet:
    """Stands in for a UNet (`__call__` and `forward_with_cache`) and runs it through CUDA
    graphs. `graphs` maps each signature to `(replay, static inputs, static outputs)`."""

    def __init__(self, unet, warmup=WARMUP_CALLS):
        self.unet = unet
        self.warmup = warmup
        self.graphs = {}

    def __getattr__(self, name):          # config, input_blocks, ...: the UNet's own
        return getattr(self.__dict__["unet"], name)

    def __call__(self, x, timesteps, context, control=None):
        controls = list(control or [])
        n = len(controls)

        def run(x, timesteps, context, *residuals):
            return (self.unet(x, timesteps, context, control=list(residuals) if n else None),)

        return self.run(("full", n), run, [x, timesteps, context, *controls])[0]

    def forward_with_cache(self, x, timesteps, context, control=None, depth=1, deep=None):
        controls = list(control or [])
        n = len(controls)
        if deep is None:
            def run(x, timesteps, context, *residuals):
                return self.unet.forward_with_cache(
                    x, timesteps, context, control=list(residuals) if n else None, depth=depth)

            return tuple(self.run(("keep", depth, n), run, [x, timesteps, context, *controls]))

        def run_shallow(deep, x, timesteps, context, *residuals):
            return self.unet.forward_with_cache(
                x, timesteps, context, control=list(residuals) if n else None, depth=depth,
                deep=deep)

        out, _ = self.run(("shallow", depth, n), run_shallow, [deep, x, timesteps, context, *controls])
        return out, deep

    def run(self, option, fn, tensors):
        """`fn(*tensors)` (a tuple of tensors) through the graph of this signature."""
        key = (option, *(_signature(t) for t in tensors))
        entry = self.graphs.get(key)
        if entry is None:
            static = [t.clone() for t in tensors]
            replay, outputs = self.capture(fn, static)
            entry = self.graphs[key] = (replay, static, outputs)
        replay, static, outputs = entry
        for buffer, t in zip(static, tensors):
            buffer.copy_(t)
        replay()
        return [o.clone() if o is not None else None for o in outputs]

    def capture(self, fn, static):
        """Warm up on a side stream, capture `fn(*static)`; returns `(replay, outputs)`."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*static)
        return graph.replay, outputs


def _signature(t):
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device


__all__ = ["GraphedUNet", "WARMUP_CALLS"]
