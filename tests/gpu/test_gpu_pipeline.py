"""The GPU-only half of "ready for the GPU" (tests/test_gpu_ready.py is the CPU half): CUDA
graphs against eager, LoRA hot-swap exact under graphs, fp16/bf16 and channels-last against
fp32, torch.compile (inductor, fullgraph) over the UNet, and a quick run of the SD1.5
benchmark. Skipped without a CUDA device.

    pytest -m gpu tests/gpu            # these and the kernel tests
    python bench/gpu_sd15.py           # the full benchmark (JSON + profile in bench/results)
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: the shared helpers
import sdfast  # noqa: E402
from _pipelines import make_reference  # noqa: E402
from test_gpu_ready import lora_model  # noqa: E402,F401  (a small SD1 file and two LoRAs)
from test_step_cache import psnr  # noqa: E402

# fp16 images in 0..1: an fp16 ulp at 1.0 is 2^-10; a replay may pick other kernels than the
# eager run (cuBLAS heuristics), so graph-vs-eager allows two ulps. Replays of one graph on the
# same weights are compared bit for bit.
GRAPH_ATOL = 2 * 2.0 ** -10

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model(lora_model):
    return lora_model


def _images(pipe, **kw):
    return pipe.generate(["a red circle", "a blue square"], seed=[1, 2], width=64, height=64,
                         steps=6, cfg=5.0, output="tensor", progress=False, **kw)


def test_cuda_graphs_match_eager_and_lora_swaps_reach_the_graphs(model):
    single, tmp = model
    pipe = sdfast.load(single, device="cuda", dtype=torch.float16)
    eager = _images(pipe)
    pipe.enable_cuda_graphs()
    assert pipe.lora_in_place
    graphed = _images(pipe)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=GRAPH_ATOL)
    ptrs = [p.data_ptr() for p in pipe.unet.parameters()]
    pipe.load_lora(tmp / "a.safetensors")
    with_a = _images(pipe)
    assert not torch.equal(with_a, graphed)                  # the captured graph saw the LoRA
    pipe.disable_cuda_graphs()
    torch.testing.assert_close(_images(pipe), with_a, rtol=0, atol=GRAPH_ATOL)    # eager + LoRA
    pipe.enable_cuda_graphs()
    pipe.load_lora(tmp / "b.safetensors", strength=0.5)
    pipe.unload_lora("b")
    assert torch.equal(_images(pipe), with_a)
    pipe.unload_lora("a")
    assert torch.equal(_images(pipe), graphed)                # exact after unloading
    assert [p.data_ptr() for p in pipe.unet.parameters()] == ptrs
    cached = _images(pipe, cache_interval=2)                  # step caching under graphs
    pipe.disable_cuda_graphs()
    torch.testing.assert_close(_images(pipe, cache_interval=2), cached, rtol=0, atol=GRAPH_ATOL)


@pytest.mark.parametrize("dtype,min_psnr", [(torch.float16, 45.0), (torch.bfloat16, 35.0)])
def test_half_precision_and_channels_last_close_to_fp32(model, dtype, min_psnr):
    single, _ = model
    ref = _images(sdfast.load(single, device="cuda", dtype=torch.float32))
    for channels_last in (False, True):
        pipe = sdfast.load(single, device="cuda", dtype=dtype, channels_last=channels_last)
        assert psnr(_images(pipe), ref).min() >= min_psnr


@torch.no_grad()
def test_inductor_fullgraph_over_the_unet(model):
    single, _ = model
    torch._dynamo.reset()
    pipe = sdfast.load(single, device="cuda", dtype=torch.float16)
    eager = _images(pipe)
    pipe.compile(backend="inductor", fullgraph=True)
    assert psnr(_images(pipe), eager).min() >= 45.0           # fp16, reordered by inductor
    torch._dynamo.reset()


def test_accelerated_diffusers_in_fp16(tmp_path):
    ref = make_reference("small_sd1", tmp_path).to("cuda", torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)

    def run():
        return ref("a red circle", num_inference_steps=4, latents=latents, output_type="pt",
                   height=64, width=64).images.float()

    before = run()
    sdfast.accelerate(ref)
    assert psnr(run(), before).min() >= 45.0


def test_sd15_benchmark_quick_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_sd15

    out = tmp_path / "gpu.json"
    assert gpu_sd15.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"]["cuda_graphs"]["it_per_s"] > 0
    assert Path(result["profile"]).read_text().strip()
