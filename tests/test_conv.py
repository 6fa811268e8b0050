"""sdfast.ops.conv2d: the cpu backend's Winograd F(4x4, 3x3) convolution (csrc/cpu/winograd.cpp)
and its GEMM convolutions (1x1, stride 2), against float64 and against the direct convolution.

Tolerances:
- Winograd, a rigorous bound: every output within gamma_n * (the same Winograd computation on
  absolute values) of the float64 convolution, gamma_n = n u / (1 - n u), u = 2^-24, the
  classic first-order bound of a floating-point computation (Higham, Accuracy and Stability of
  Numerical Algorithms, ch. 3). n counts the roundings along any path to an output: at most 4
  in the input transform (two passes of two), 8 in the weight transform (two passes of four,
  counting the constants -8/15 and 1/30, which fp32 cannot hold exactly), 1 product, Cin - 1 in
  the channel sum, 6 in the output transform, 2 for bias and add: n = Cin + 20.
- Winograd against the direct convolution: that bound is loose (worst case, ~Cin u), so its
  error is also compared with the direct fp32 convolution's (F.conv2d, oneDNN) on the same
  input: rms error at most WINOGRAD_ERROR_FACTOR times the direct one's (measured: up to 6x
  against oneDNN's NCHW convolution, 1-3x against its channels-last one). The models' parity
  tests earn the same factor (tests/_diffusers_models.py).
- GEMM convolutions: the earned bound of the other ops (tests/test_ops_cpu.py).
Inputs are what the models feed a convolution: SiLU of group-normed activations with per-channel
scales (a few channels 8x larger, as trained networks have), weights with the default init's
spread, uniform or heavy-tailed (Student t, 3 degrees of freedom: trained weights have outliers).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from _diffusers_models import WINOGRAD_ERROR_FACTOR, earned_error
from sdfast import ops
from sdfast.errors import SdfastError
from sdfast.ops import registry

HAS_CPU = "cpu" in ops.backends("conv2d")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="sdfast._C not built")

# Toom-Cook matrices of the points 0, 1/2, -1/2, 2, -2, inf (csrc/cpu/winograd.cpp).
BT = torch.tensor([[1, 0, -4.25, 0, 1, 0], [0, -2, -4, 0.5, 1, 0], [0, 2, -4, -0.5, 1, 0],
                   [0, -0.5, -0.25, 2, 1, 0], [0, 0.5, -0.25, -2, 1, 0], [0, 1, 0, -4.25, 0, 1]],
                  dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [-8 / 15, -4 / 15, -2 / 15], [-8 / 15, 4 / 15, -2 / 15],
                  [1 / 30, 1 / 15, 2 / 15], [1 / 30, -1 / 15, 2 / 15], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0.5, -0.5, 2, -2, 0], [0, 0.25, 0.25, 4, 4, 0],
                   [0, 0.125, -0.125, 8, -8, 1]], dtype=torch.float64)


def winograd64(x, w, bt=BT, g=G, at=AT, block=64):
    """F(4x4, 3x3) of x [B, C, H, W] with w [O, C, 3, 3] (no bias) in float64, by the matrices
    given; with their absolute values and |x|, |w| it is the rounding bound's magnitude."""
    b, c, h, wd = x.shape
    th, tw = -(-h // 4), -(-wd // 4)
    xp = F.pad(x.double(), (1, 4 * tw - wd + 1, 1, 4 * th - h + 1))
    d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # [B, C, th, tw, 6, 6]
    v = torch.einsum("ij,bcxyjk,lk->xyilbc", bt, d, bt).reshape(th * tw * 36, b, c)
    outs = []
    for o0 in range(0, w.shape[0], block):  # [O, C, 3, 3] -> U [36, C, O] per block of O
        u = torch.einsum("ij,ocjk,lk->ilco", g, w[o0:o0 + block].double(), g).reshape(36, c, -1)
        m = torch.bmm(v, u.repeat(th * tw, 1, 1))  # [th*tw*36, B, O]
        m = m.reshape(th, tw, 6, 6, b, -1)
        outs.append(torch.einsum("ij,xyjkbo,lk->boxiyl", at, m, at))  # [B, O, th, 4, tw, 4]
    y = torch.cat(outs, 1).reshape(b, w.shape[0], 4 * th, 4 * tw)
    return y[:, :, :h, :wd]


def activations(b, c, h, w, seed):
    """SiLU(normed activations * per-channel scale + shift), a few channels 8x larger."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.3 * torch.randn(c, 1, 1, generator=g))
    scale[: max(1, c // 64)] *= 8
    shift = 0.3 * torch.randn(c, 1, 1, generator=g)
    return F.silu(torch.randn(b, c, h, w, generator=g) * scale + shift)


def weights(o, c, seed, kind="uniform"):
    """The default init's spread (std 1 / sqrt(9 C)), uniform or Student t (heavy tails)."""
    g = torch.Generator().manual_seed(seed)
    std = (9 * c) ** -0.5
    if kind == "uniform":
        return (torch.rand(o, c, 3, 3, generator=g) * 2 - 1) * std * 3 ** 0.5
    # Student t with 3 degrees of freedom: z / sqrt(chi2_3 / 3), from the seeded generator
    z = torch.randn(o, c, 3, 3, generator=g)
    chi2 = torch.randn(3, o, c, 3, 3, generator=g).pow(2).sum(0)
    t = z / (chi2 / 3).sqrt()
    return t / t.std() * std


# SD UNet / VAE channel counts (spatial sizes cut down: the error depends on the channel sum,
# the border tiles are present at any size), plus small ones.
SD_CASES = [(320, 320, 16, 16), (640, 640, 8, 8), (1280, 1280, 8, 8), (2560, 1280, 4, 4),
            (960, 320, 12, 12), (512, 512, 8, 8)]
SMALL_CASES = [(32, 32, 9, 13), (64, 64, 16, 16), (128, 128, 8, 8)]


def _cpu_conv(x, w, b=None, add=None):
    return ops.conv2d(x, w, b, 1, 1, add=add, backend="cpu")


def _assert_within_rounding_bound(out, x, w, b=None, add=None):
    """|out - exact| <= gamma_{Cin + 20} * (|A^T| [sum |G| |w| |G^T| (.) |B^T| |x| |B|] |A|
    + |bias| + |add|), elementwise (see the module docstring); returns the error."""
    exact = ops.conv2d_ref(x.double(), w.double(), None if b is None else b.double(), [1, 1],
                           [1, 1], None if add is None else add.double())
    magnitude = winograd64(x.abs(), w.abs(), BT.abs(), G.abs(), AT.abs())
    if b is not None:
        magnitude += b.double().abs()[:, None, None]
    if add is not None:
        magnitude += add.double().abs()
    n, u = x.shape[1] + 20, 2.0 ** -24
    err = (out.double() - exact).abs()
    bound = n * u / (1 - n * u) * magnitude
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"
    return err, exact


def test_winograd64_is_the_convolution():
    """The test's float64 Winograd (whose absolute version gives the bound) is exact."""
    x, w = torch.randn(2, 5, 9, 7, dtype=torch.float64), torch.randn(3, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(winograd64(x, w), F.conv2d(x, w, padding=1), rtol=0, atol=1e-12)


@needs_cpu
@pytest.mark.parametrize("kind", ["uniform", "student-t"])
@pytest.mark.parametrize("cin, cout, h, w", SD_CASES + SMALL_CASES)
def test_winograd_error_bounds(cin, cout, h, w, kind):
    x = activations(2, cin, h, w, seed=cin + h).contiguous(memory_format=torch.channels_last)
    wt = weights(cout, cin, seed=cout, kind=kind)
    bias = 0.1 * torch.randn(cout, generator=torch.Generator().manual_seed(3))
    err, exact = _assert_within_rounding_bound(_cpu_conv(x, wt, bias), x, wt, bias)
    direct = (F.conv2d(x.contiguous(), wt, bias, padding=1).double() - exact).pow(2).mean().sqrt()
    ratio = (err.pow(2).mean().sqrt() / direct).item()
    assert ratio <= WINOGRAD_ERROR_FACTOR, f"rms error {ratio:.2f}x the direct convolution's"


@needs_cpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias, add", [(True, False), (False, True), (True, True)])
def test_winograd_bias_add_layouts(layout, bias, add):
    """Odd sizes (partial tiles), channels past whole vectors and blocks; the output keeps the
    input's memory format, as F.conv2d's."""
    g = torch.Generator().manual_seed(0)
    x = activations(2, 70, 9, 7, seed=1)
    w = weights(67, 70, seed=2)
    b = torch.randn(67, generator=g) if bias else None
    a = torch.randn(2, 67, 9, 7, generator=g) if add else None
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    out = _cpu_conv(x, w, b, a)
    ref32 = ops.conv2d(x, w, b, 1, 1, add=a, backend="reference")
    assert out.shape == ref32.shape and out.stride() == ref32.stride()
    _assert_within_rounding_bound(out, x, w, b, a)


@needs_cpu
@pytest.mark.parametrize("cin, cout, k, stride, padding, hw", [
    (320, 320, 1, 1, 0, 16),     # UNet skip / proj_in
    (48, 24, 1, 2, 0, 9),        # strided 1x1
    (64, 64, 3, 2, 1, 15),       # UNet downsampler
    (32, 32, 3, 2, 0, 17),       # VAE downsampler (after its own pad)
    (16, 24, 3, 1, 2, 10),       # other padding: the GEMM path, not Winograd
    (8, 16, 5, 1, 2, 12),
])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gemm_convolutions(cin, cout, k, stride, padding, hw, layout):
    g = torch.Generator().manual_seed(cin)
    x = activations(2, cin, hw, hw + 1, seed=cin)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g)
    ref32 = ops.conv2d(x, w, b, stride, padding, backend="reference")
    a = torch.randn(ref32.shape, generator=g)
    out = ops.conv2d(x, w, b, stride, padding, add=a, backend="cpu")
    ref32 = ops.conv2d(x, w, b, stride, padding, add=a, backend="reference")
    ref64 = ops.conv2d_ref(x.double(), w.double(), b.double(), [stride] * 2, [padding] * 2, a.double())
    assert out.shape == ref32.shape and out.stride() == ref32.stride()
    err, bound = earned_error(out, ref32, ref64)
    assert err <= bound, f"max|out - ref64| = {err:.3g} > {bound:.3g}"


@needs_cpu
def test_in_place_weight_changes_are_seen():
    """LoRA merges rewrite a conv weight in place (the cpu backend's lora_merge_ through a raw
    pointer, LoraStack's unload with copy_): the next convolution uses the new values. The
    kernel keeps no transformed copy of a weight, so none can go stale."""
    x = activations(2, 64, 8, 8, seed=5).contiguous(memory_format=torch.channels_last)
    w = weights(64, 64, seed=6)
    original = w.clone()
    before = _cpu_conv(x, w)
    up, down = torch.randn(64, 4, 1, 1), torch.randn(4, 64, 3, 3)
    ops.lora_merge_(w, up, down, 0.5, backend="cpu")
    merged = _cpu_conv(x, w)
    expect = F.conv2d(x.double(), original.double() + 0.5 * torch.einsum(
        "or,rikl->oikl", up[:, :, 0, 0].double(), down.double()), padding=1)
    assert (merged.double() - expect).abs().max() < 1e-4 * expect.abs().max()
    assert (merged - before).abs().max() > 1e-2
    with torch.no_grad():
        w.copy_(original)
    assert torch.equal(_cpu_conv(x, w), before)


@needs_cpu
def test_lora_stack_load_and_unload_reach_the_convolutions():
    """End to end: a LoRA on a UNet conv through LoraStack (merge, strength change, unload)."""
    from sdfast.addons.lora import Loaded, LoraFile, LoraModule, LoraStack
    from sdfast.models.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(32, 64, 32, 8).eval()
    conv = block.in_layers[2]
    x = activations(2, 32, 8, 8, seed=7).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 64)
    with torch.no_grad():
        base = block(x, emb)
        base_w = conv.weight.detach().clone()
        up, down = torch.randn(32, 2, 1, 1), torch.randn(2, 32, 3, 3)
        # Independent references of the merge: no alpha and strength 1, so scale 1 (kohya). The
        # block with W + up @ down in float64, and the same rounded to fp32 run by the direct
        # convolution (the fp32 error the bound earns; not the block under test, whose weight
        # might be wrong).
        w64 = base_w.double() + torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double())
        block64, block32 = copy.deepcopy(block).double(), copy.deepcopy(block)
        block64.in_layers[2].weight.copy_(w64)
        block32.in_layers[2].weight.copy_(w64.float())
        ref64 = block64(x.double(), emb.double())
        with ops.use_backend(conv2d="reference"):
            ref32 = block32(x, emb)
        module = LoraModule(name="in", component="unet", param="in_layers.2.weight", rows=None,
                            kind="lora", tensors={"up": up, "down": down})
        stack = LoraStack({"unet": block})
        stack.add(Loaded("a", None, 1.0, 1.0, LoraFile([module])))
        expect_w = conv.weight.detach().clone()
        assert not torch.equal(expect_w, base_w)
        merged = block(x, emb)
        # The LoRA has an effect far above rounding (measured: 1.9, outputs up to 17)...
        assert (merged - base).abs().max() > 0.1
        # ...and it is the right one: the earned bound against the float64 block, the direct
        # fp32 convolution's error times WINOGRAD_ERROR_FACTOR (the cpu backend runs this 3x3
        # conv as Winograd). Measured: error 2.5e-6, bound 1.6e-5; a 1% wrong scale is 6e-4 off.
        err, bound = earned_error(merged, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
        assert err <= bound, f"max|merged - ref64| = {err:.3g} > {bound:.3g}"
        stack.set_strength("a", 0.0, 0.0)
        assert torch.equal(block(x, emb), base)
        stack.set_strength("a", 1.0, 1.0)
        assert torch.equal(conv.weight, expect_w) and torch.equal(block(x, emb), merged)
        stack.remove("a")
        assert torch.equal(block(x, emb), base)


def test_selection_and_forcing():
    """Automatic selection follows the measured hints; forcing works wherever the cpu backend
    can run; arguments it cannot run raise with its reason."""
    x = torch.randn(2, 32, 8, 8)
    w3 = torch.randn(32, 32, 3, 3)
    auto = lambda *a: registry.select("conv2d", a)[0]  # noqa: E731
    if HAS_CPU:
        assert auto(x, w3, None, [1, 1], [1, 1], None) == "cpu"
        assert auto(torch.randn(2, 4, 8, 8), torch.randn(32, 4, 3, 3), None, [1, 1], [1, 1], None) == "reference"
        assert auto(x, w3, None, [2, 2], [1, 1], None) == "reference"  # small weight: oneDNN
        assert auto(torch.randn(2, 1280, 8, 8), torch.empty(1280, 1280, 3, 3),
                    None, [2, 2], [1, 1], None) == "cpu"
        assert ops.conv2d(x, w3, None, 2, 1, backend="cpu").shape == (2, 32, 4, 4)
        with pytest.raises(SdfastError, match="float64; the cpu backend takes float32"):
            ops.conv2d(x.double(), w3.double(), backend="cpu")
    assert auto(x.double(), w3.double(), None, [1, 1], [1, 1], None) == "reference"


def test_argument_checks():
    x, w = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3)
    with pytest.raises(SdfastError, match="expects 8 input channels"):
        ops.conv2d(x[:, :5], w)
    with pytest.raises(SdfastError, match="bias has shape"):
        ops.conv2d(x, w, torch.zeros(5))
    with pytest.raises(SdfastError, match="add has shape"):
        ops.conv2d(x, w, padding=1, add=torch.zeros(1, 4, 5, 5))
    with pytest.raises(SdfastError, match="does not fit"):
        ops.conv2d(x[:, :, :2], w)
    with pytest.raises(SdfastError, match="stride must be positive"):
        ops.conv2d(x, w, stride=0)
    with pytest.raises(SdfastError, match="takes \\[B, C, H, W\\]"):
        ops.conv2d(x[0], w)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_custom_op_checks_gradients_and_compile(backend):
    if backend not in ops.backends("conv2d"):
        pytest.skip(f"{backend} not available")
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    w, b, a = torch.randn(16, 16, 3, 3), torch.randn(16), torch.randn(2, 16, 6, 5)
    torch.library.opcheck(torch.ops.sdfast.conv2d.default, (x, w, b, [1, 1], [1, 1], a, backend))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a)]
    ops.conv2d(leaves[0], leaves[1], leaves[2], 1, 1, add=leaves[3], backend=backend).square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, w, b, a)]
    (F.conv2d(refs[0], refs[1], refs[2], padding=1) + refs[3]).square().sum().backward()
    for got, want in zip(leaves, refs):  # the loss's gradient holds the forward's rounding
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-5 * want.grad.abs().max().item())
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: ops.conv2d(*t, 1, 1, backend=backend), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, b), ops.conv2d(x, w, b, 1, 1, backend=backend))


def test_meta_tensors_and_autocast_take_the_plain_convolution():
    # meta tensors (FLOP counting, shape checks) have no autocast state: shapes only
    x, w = torch.empty(2, 32, 9, 7, device="meta"), torch.empty(16, 32, 3, 3, device="meta")
    assert ops.conv2d(x, w, padding=1).shape == (2, 16, 9, 7)
    # under CPU autocast torch's convolution casts the inputs; the result is bf16 as F.conv2d's
    x, w, b = torch.randn(2, 32, 9, 7), torch.randn(16, 32, 3, 3), torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ops.conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
