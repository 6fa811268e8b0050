"""What makes sdfast ready for the GPU, checked on the CPU: fp16/bf16 and channels-last loads,
torch.compile over the whole UNet (fullgraph, custom ops inside), the in-place LoRA merging
that CUDA graphs rely on, and the graph cache's plumbing (with an eager stand-in for the
capture; tests/gpu/test_gpu_pipeline.py runs the real CUDA graphs).
"""
import pytest
import torch
from safetensors.torch import save_file

import sdfast
from _pipelines import family_of, make_reference, save_single_file
from sdfast.cuda_graphs import GraphedUNet
from sdfast.errors import SdfastError
from sdfast.models.unet import UNetConfig, UNetModel
from test_lora import random_kohya_lora
from test_step_cache import PROMPTS, psnr

TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                 context_dim=32, head_dim=16)


@pytest.fixture(scope="module")
def builtin():
    return sdfast.load(None, device="cpu")


def _images(pipe, **kw):
    return pipe.generate(PROMPTS, seed=[1, 2], steps=8, cfg=5.0, output="tensor", progress=False,
                         **kw)


@pytest.mark.parametrize("name,dtype,min_psnr", [
    # One rounding to bf16 (8 significant bits) is a relative error of up to 2^-9, ~54 dB;
    # fp16 (11 bits) ~72 dB. Measured on the built-in model, 8 steps: bf16 50-52 dB, fp16
    # 72-73 dB from the fp32 image; the bounds leave ~10-15 dB for other model versions.
    ("bf16", torch.bfloat16, 40.0),
    ("fp16", torch.float16, 55.0),
])
def test_half_precision_loads_generate_close_to_fp32(builtin, name, dtype, min_psnr):
    pipe = sdfast.load(None, device="cpu", dtype=name)
    assert pipe.dtype == dtype
    assert {p.dtype for p in pipe.unet.parameters()} == {dtype}
    assert psnr(_images(pipe), _images(builtin)).min() >= min_psnr


def test_bad_dtype_is_an_error():
    with pytest.raises(SdfastError, match="unknown dtype 'fp8'"):
        sdfast.load(None, dtype="fp8")


def test_channels_last_load(builtin):
    pipe = sdfast.load(None, device="cpu", channels_last=True)
    conv = pipe.unet.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # The same fp32 math in another memory order: only summation order changes.
    torch.testing.assert_close(_images(pipe), _images(builtin), rtol=0, atol=1e-4)


def _tiny_unet():
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(**TINY_UNET)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([600.0, 20.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    return unet, x, t, ctx


@torch.no_grad()
def test_torch_compile_traces_the_whole_unet_with_the_custom_ops():
    """fullgraph=True fails on any graph break: the fused ops must trace as single nodes."""
    torch._dynamo.reset()
    unet, x, t, ctx = _tiny_unet()
    eager = unet(x, t, ctx)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, ctx), eager, rtol=0, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_torch_compile_of_the_step_cache_split_and_the_pipeline(builtin):
    torch._dynamo.reset()
    unet, x, t, ctx = _tiny_unet()
    eager = unet(x, t, ctx)
    split = torch.compile(unet.forward_with_cache, backend="aot_eager", fullgraph=True)
    out, deep = split(x, t, ctx, depth=2)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    shallow, _ = split(x, t, ctx, depth=2, deep=deep)
    torch.testing.assert_close(shallow, eager, rtol=0, atol=1e-6)
    pipe = sdfast.load(None, device="cpu")
    pipe.compile(backend="aot_eager")
    # Compiled, the graph may round differently from eager (op order, decompositions); the
    # bound is the spread of two correct eager runs, the dispatched kernels against the
    # pure-torch reference backend (built-in model v4, 8 steps: 3.5e-5; compiled: 1.1e-5).
    eager = _images(builtin)
    with sdfast.ops.use_backend("reference"):
        spread = float((_images(builtin) - eager).abs().max())
    torch.testing.assert_close(_images(pipe), eager, rtol=0, atol=max(1e-5, spread))
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inplace")
    ref = make_reference("small_sd1", tmp)
    single = save_single_file(ref, family_of("small_sd1"), tmp / "model.safetensors")
    save_file(random_kohya_lora(ref, seed=1), str(tmp / "a.safetensors"))
    save_file(random_kohya_lora(ref, seed=2, conv=False), str(tmp / "b.safetensors"))
    return single, tmp


def _params(pipe):
    return {f"{c}.{n}": p for c, m in (("unet", pipe.unet), ("te", pipe.text_encoder))
            for n, p in m.named_parameters()}


def test_lora_in_place_keeps_every_weight_address(lora_model):
    single, tmp = lora_model
    pipe = sdfast.load(single)
    pipe.lora_in_place = True
    params = _params(pipe)
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    original = {k: p.detach().clone() for k, p in params.items()}
    pipe.load_lora(tmp / "a.safetensors")
    with_a = {k: p.detach().clone() for k, p in params.items()}
    assert any(not torch.equal(with_a[k], original[k]) for k in original)
    pipe.load_lora(tmp / "b.safetensors", strength=0.5)
    pipe.set_lora_strength("a", 0.3)
    pipe.unload_lora("b")
    pipe.set_lora_strength("a", 1.0)
    assert all(torch.equal(p, with_a[k]) for k, p in params.items())       # exact, in place
    pipe.unload_lora("a")
    assert all(torch.equal(p, original[k]) for k, p in params.items())
    assert {k: p.data_ptr() for k, p in _params(pipe).items()} == ptrs


def test_default_lora_merging_swaps_storage(lora_model):
    """The default keeps the loader's mmap as the original (the address changes), which is
    why enable_cuda_graphs switches to in place."""
    single, tmp = lora_model
    pipe = sdfast.load(single)
    ptrs = {k: p.data_ptr() for k, p in _params(pipe).items()}
    pipe.load_lora(tmp / "a.safetensors")
    assert {k: p.data_ptr() for k, p in _params(pipe).items()} != ptrs


def test_cuda_graphs_need_a_cuda_device(builtin):
    with pytest.raises(SdfastError, match="CUDA graphs need a CUDA device"):
        builtin.enable_cuda_graphs()


class EagerGraphs(GraphedUNet):
    """The graph cache with an eager stand-in for the CUDA capture: `replay` recomputes `fn`
    on the static inputs and writes into the static outputs, as a graph replay does."""

    def capture(self, fn, static):
        outputs = fn(*static)

        def replay():
            for buffer, fresh in zip(outputs, fn(*static)):
                buffer.copy_(fresh)

        self.captures = getattr(self, "captures", 0) + 1
        return replay, outputs


@torch.no_grad()
def test_graph_cache_plumbing_per_signature(builtin):
    graphed = EagerGraphs(builtin.unet)
    builtin._graphed = graphed
    try:
        plain = _images(builtin, cache_interval=1)
        assert graphed.captures == 1                        # one size, batch, prompt length
        again = _images(builtin)
        cached = _images(builtin, cache_interval=3)
        assert graphed.captures == 3                        # + the keep and shallow branches
        builtin.generate(PROMPTS[0], steps=2, progress=False)
        assert graphed.captures == 4                        # batch 1 x CFG: a new signature
    finally:
        builtin.disable_cuda_graphs()
    assert torch.equal(plain, again)
    assert torch.equal(plain, _images(builtin))
    assert torch.equal(cached, _images(builtin, cache_interval=3))
