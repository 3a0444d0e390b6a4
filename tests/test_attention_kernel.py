"""The compiled CPU kernel (impl="kernel") against the brute-force formula and the naive path."""
import math

import pytest
import torch

from aa_detection.layers import relative_attention_2d
from aa_detection.layers.kernel import kernel_attention, kernel_available, kernel_isas, using_kernel_isa

from test_relative_attention import brute_force, random_inputs

pytestmark = pytest.mark.skipif(
    not kernel_available(),
    reason="aa_detection._C is not built (run `python setup.py build_ext --inplace` or `pip install -e .`)",
)

# (B, Nh, H, W, dkh, dvh): 1x1, 1xN, Nx1, odd non-square, B and Nh > 1, the R-50 head widths, and a
# dkh above the specialised widths.
SHAPES = [
    (1, 1, 1, 1, 3, 1),
    (1, 2, 1, 7, 2, 3),
    (2, 1, 6, 1, 5, 4),
    (2, 3, 3, 5, 4, 2),
    (2, 2, 5, 9, 3, 2),
    (1, 2, 7, 4, 6, 3),
    (2, 2, 4, 6, 13, 6),
    (1, 1, 3, 5, 20, 7),
]


@pytest.fixture(params=kernel_isas())
def isa(request):
    """Each instruction set the kernel was compiled for that this CPU runs, in turn."""
    with using_kernel_isa(request.param):
        yield request.param


def _rel_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_brute_force(shape, isa):
    inputs = random_inputs(*shape)
    out = relative_attention_2d(*inputs, impl="kernel")
    assert out.shape == (*shape[:4], shape[5]) and out.dtype == torch.float32
    assert _rel_error(out, brute_force(*inputs)) < 1e-5


def test_kernel_content_only_matches_brute_force(isa):
    inputs = random_inputs(2, 2, 3, 4, 3, 2, relative=False)
    assert _rel_error(relative_attention_2d(*inputs, impl="kernel"), brute_force(*inputs)) < 1e-5


def test_kernel_large_logits_stay_finite(isa):
    q, k, v, rel_h, rel_w = random_inputs(1, 2, 6, 7, 4, 3)
    inputs = (q * 30, k * 30, v, rel_h * 30, rel_w * 30)
    out = relative_attention_2d(*inputs, impl="kernel")
    ref = relative_attention_2d(*(t.double() for t in inputs), impl="naive")
    assert torch.isfinite(out).all() and _rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_gradients_match_naive(shape, isa):
    inputs = [t.requires_grad_() for t in random_inputs(*shape)]
    grad_out = torch.randn(*shape[:4], shape[5])
    grads = {}
    for impl in ("naive", "kernel"):
        out = relative_attention_2d(*inputs, impl=impl)
        grads[impl] = torch.autograd.grad(out, inputs, grad_out)
    for name, g_naive, g_kernel in zip("q k v rel_h rel_w".split(), grads["naive"], grads["kernel"]):
        # A table with a single offset (H or W = 1) adds one constant per query: its gradient is zero
        # up to rounding, so compare absolutely there.
        assert torch.allclose(g_kernel, g_naive, rtol=1e-4, atol=1e-5), name


def test_kernel_threads_agree():
    """Splitting queries across threads (and key gradients across query groups) changes nothing."""
    inputs = [t.requires_grad_() for t in random_inputs(1, 1, 9, 11, 3, 2)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            out = relative_attention_2d(*inputs, impl="kernel")
            results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    finally:
        torch.set_num_threads(threads)
    (out1, g1), (out4, g4) = results
    assert torch.allclose(out1, out4, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g1, g4))


def test_auto_uses_the_kernel_on_the_cpu(monkeypatch):
    """Below and above NAIVE_MAX_PIXELS, through relative_attention_2d and through the layer's qkv route."""
    from aa_detection.layers import AAConv2d, kernel

    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return kernel_attention(*args)

    monkeypatch.setattr(kernel, "kernel_attention", spy)
    relative_attention_2d(*random_inputs(1, 1, 2, 3, 2, 2))
    relative_attention_2d(*random_inputs(1, 1, 17, 17, 2, 2))
    AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4)(torch.randn(1, 8, 17, 17))
    assert calls == [(1, 6, 2, 3), (1, 6, 17, 17), (1, 12, 17, 17)]


# (B, Nh, H, W, dkh, dvh, table rows per side): tables shorter than the map (offsets clipped to the last
# row), longer than the map, W above one vector of 16 lanes.
QKV_SHAPES = [(2, 2, 5, 9, 3, 2, 5), (1, 3, 4, 18, 13, 6, 3), (2, 1, 6, 3, 2, 3, 10), (1, 2, 3, 33, 6, 3, 33)]


def _qkv_reference(qkv, Nh, dk, dv, rel_h, rel_w):
    """The naive path with full-size tables gathered from the clipped ones."""
    from aa_detection.layers.relative_logits import relative_table, split_heads

    B, _, H, W = qkv.shape
    q, k, v = split_heads(qkv, Nh, dk, dv)
    logits_h = torch.einsum("bnyxd,ykd->bnyxk", q, relative_table(rel_h, H))
    logits_w = torch.einsum("bnyxd,xkd->bnyxk", q, relative_table(rel_w, W))
    logits = torch.einsum("bnyxd,bnuvd->bnyxuv", q, k) + logits_h[..., :, None] + logits_w[..., None, :]
    weights = torch.softmax(logits.reshape(B, Nh, H * W, H * W) / math.sqrt(dk // Nh), -1)
    out = weights @ v.reshape(B, Nh, H * W, -1)
    return out.reshape(B, Nh, H, W, -1).permute(0, 1, 4, 2, 3).reshape(B, dv, H, W)


@pytest.mark.parametrize("shape", QKV_SHAPES)
def test_kernel_on_qkv_layout_matches_reference(shape, isa):
    from aa_detection.layers.relative_attention import relative_attention_qkv

    B, Nh, H, W, dkh, dvh, L = shape
    dk, dv = Nh * dkh, Nh * dvh
    torch.manual_seed(0)
    qkv = torch.randn(B, 2 * dk + dv, H, W, requires_grad=True)
    rel_h = torch.randn(2 * L - 1, dkh, requires_grad=True)
    rel_w = torch.randn(2 * L - 1, dkh, requires_grad=True)
    grad_out = torch.randn(B, dv, H, W)
    results = []
    for fn in (_qkv_reference, lambda *a: relative_attention_qkv(*a, impl="kernel")):
        out = fn(qkv, Nh, dk, dv, rel_h, rel_w)
        results.append((out, torch.autograd.grad(out, (qkv, rel_h, rel_w), grad_out)))
    (ref, ref_grads), (out, grads) = results
    assert _rel_error(out, ref) < 1e-5
    for name, g, r in zip(("qkv", "rel_h", "rel_w"), grads, ref_grads):
        assert _rel_error(g, r) < 1e-5, name


def test_kernel_on_qkv_layout_content_only(isa):
    from aa_detection.layers.relative_attention import relative_attention_qkv

    qkv = torch.randn(2, 2 * 6 + 4, 4, 5, requires_grad=True)
    ref = relative_attention_qkv(qkv, 2, 6, 4, impl="naive")
    out = relative_attention_qkv(qkv, 2, 6, 4, impl="kernel")
    assert _rel_error(out, ref) < 1e-5
    g = torch.randn_like(out)
    assert _rel_error(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0]) < 1e-5


def test_kernel_on_a_strided_qkv_view():
    """A non-contiguous qkv (e.g. a channel slice) is copied, not misread."""
    from aa_detection.layers.relative_attention import relative_attention_qkv

    base = torch.randn(1, 40, 3, 7)
    qkv = base[:, 4:4 + 2 * 8 + 8]
    rel_h, rel_w = torch.randn(5, 4), torch.randn(13, 4)
    ref = relative_attention_qkv(qkv, 2, 8, 8, rel_h, rel_w, impl="naive")
    assert _rel_error(relative_attention_qkv(qkv, 2, 8, 8, rel_h, rel_w, impl="kernel"), ref) < 1e-5


def test_layer_compiles_without_graph_breaks():
    """The kernel is an operator with fake and autograd implementations: torch.compile captures AAConv2d
    (default impl) as one graph, and the compiled layer's outputs and gradients equal eager ones."""
    from aa_detection.layers import AAConv2d

    torch.manual_seed(0)
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, max_relative_size=9)
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x), layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.rel_h, layer.qkv.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, layer.rel_h, layer.qkv.weight])
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))


def test_kernel_isa_choice():
    """The best instruction set is in use by default; one this CPU does not run is refused by name."""
    from aa_detection import _C

    assert _C.kernel_isa() == kernel_isas()[0] and kernel_isas()[-1] == "default"
    with pytest.raises(ValueError, match="'neon' does not run on this CPU; it runs " + ", ".join(kernel_isas())):
        with using_kernel_isa("neon"):
            pass
    assert _C.kernel_isa() == kernel_isas()[0]


def test_kernel_at_its_widest_heads_matches_naive(isa):
    """Head widths of KERNEL_MAX_HEAD_WIDTH fill the kernel's per-query buffers: values and gradients as naive's."""
    from aa_detection.layers.kernel import KERNEL_MAX_HEAD_WIDTH

    inputs = [t.requires_grad_() for t in random_inputs(2, 2, 3, 5, KERNEL_MAX_HEAD_WIDTH, KERNEL_MAX_HEAD_WIDTH)]
    grad_out = torch.randn(2, 2, 3, 5, KERNEL_MAX_HEAD_WIDTH)
    out, ref = (relative_attention_2d(*inputs, impl=impl) for impl in ("kernel", "naive"))
    assert _rel_error(out, ref) < 1e-5
    for name, g, g_ref in zip("q k v rel_h rel_w".split(), torch.autograd.grad(out, inputs, grad_out),
                              torch.autograd.grad(ref, inputs, grad_out)):
        assert _rel_error(g, g_ref) < 1e-4, name


def test_kernel_width_limit_matches_the_compiled_kernel():
    from aa_detection.layers.kernel import KERNEL_MAX_HEAD_WIDTH

    widest = random_inputs(1, 1, 2, 3, KERNEL_MAX_HEAD_WIDTH, 2)
    assert relative_attention_2d(*widest, impl="kernel").shape == (1, 1, 2, 3, 2)
    with pytest.raises(RuntimeError, match="head widths"):
        relative_attention_2d(*random_inputs(1, 1, 2, 3, KERNEL_MAX_HEAD_WIDTH + 1, 2), impl="kernel")
    wide = KERNEL_MAX_HEAD_WIDTH + 1  # the compiled operator's own check, past the Python one
    with pytest.raises(RuntimeError, match=rf"head widths must lie in \[1, {KERNEL_MAX_HEAD_WIDTH}\]"):
        torch.ops.aa_detection.attention_forward(torch.randn(1, 3 * wide, 2, 3), torch.randn(3, wide),
                                                 torch.randn(5, wide), 1, wide, wide, wide ** -0.5)
