import math

import pytest
import torch

from aa_detection.layers import relative_attention_2d, relative_table
from aa_detection.layers.kernel import kernel_available


def brute_force(q, k, v, rel_h, rel_w):
    """The paper's formula, one query and one key at a time."""
    B, Nh, H, W, dk = q.shape
    out = torch.zeros(*q.shape[:4], v.shape[-1], dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(B):
        for n in range(Nh):
            keys = [(yj, xj) for yj in range(H) for xj in range(W)]
            for yi in range(H):
                for xi in range(W):
                    qi = q[b, n, yi, xi]
                    logits = []
                    for yj, xj in keys:
                        logit = qi @ k[b, n, yj, xj]
                        if rel_h is not None:
                            logit = logit + qi @ rel_h[yj - yi + H - 1].double() + qi @ rel_w[xj - xi + W - 1].double()
                        logits.append(logit / math.sqrt(dk))
                    weights = torch.softmax(torch.stack(logits), 0)
                    out[b, n, yi, xi] = sum(w * v[b, n, yj, xj] for w, (yj, xj) in zip(weights, keys))
    return out


def random_inputs(B, Nh, H, W, dk, dv, dtype=torch.float32, relative=True):
    q, k = (torch.randn(B, Nh, H, W, dk, dtype=dtype) for _ in range(2))
    v = torch.randn(B, Nh, H, W, dv, dtype=dtype)
    if not relative:
        return q, k, v, None, None
    return q, k, v, torch.randn(2 * H - 1, dk, dtype=dtype), torch.randn(2 * W - 1, dk, dtype=dtype)


SHAPES = [(2, 3, 3, 5, 4, 2), (1, 1, 1, 1, 3, 1), (1, 2, 1, 7, 2, 3), (2, 1, 6, 1, 5, 4), (1, 2, 4, 4, 3, 6)]


@pytest.mark.parametrize("impl", ["naive", "fused", "flex", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_brute_force(impl, shape):
    inputs = random_inputs(*shape)
    out = relative_attention_2d(*inputs, impl=impl)
    ref = brute_force(*inputs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("impl", ["naive", "fused", "flex"])
def test_content_only_matches_brute_force(impl):
    inputs = random_inputs(2, 2, 3, 4, 3, 2, relative=False)
    ref = brute_force(*inputs)
    out = relative_attention_2d(*inputs, impl=impl)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_and_naive_gradients_agree(shape):
    inputs = [t.requires_grad_() for t in random_inputs(*shape)]
    grad_out = torch.randn(*shape[:4], shape[5])
    grads = {}
    for impl in ("naive", "fused"):
        out = relative_attention_2d(*inputs, impl=impl)
        grads[impl] = torch.autograd.grad(out, inputs, grad_out)
    for name, g_naive, g_fused in zip("q k v rel_h rel_w".split(), grads["naive"], grads["fused"]):
        if shape[2] * shape[3] > 1:  # a single key gets weight 1 whatever q, k and the tables are
            assert g_naive.abs().sum() > 0, name
        assert torch.allclose(g_naive, g_fused, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_gradcheck_float64(impl):
    inputs = [t.requires_grad_() for t in random_inputs(1, 2, 2, 3, 2, 2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *x: relative_attention_2d(*x, impl=impl), inputs)


def _relative_norm_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("impl", ["naive", "fused", pytest.param("kernel", marks=pytest.mark.skipif(
    not kernel_available(), reason="aa_detection._C is not built"))])
def test_bfloat16_close_to_float32(impl):
    """bf16 inputs: the fp32 computation on the same (rounded) values, rounded once to bf16; gradients
    within bf16's precision of the fp32 ones."""
    torch.manual_seed(0)
    bf16 = [t.bfloat16().requires_grad_() for t in random_inputs(2, 2, 5, 7, 8, 4)]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    grad_out = torch.randn(2, 2, 5, 7, 4)
    out, ref = relative_attention_2d(*bf16, impl=impl), relative_attention_2d(*fp32, impl="naive")
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref.double()).abs() <= 2**-8 * ref.abs().double() + 1e-6).all()
    out.float().backward(grad_out)
    ref.backward(grad_out)
    for name, a, b in zip("q k v rel_h rel_w".split(), bf16, fp32):
        assert a.grad.dtype == torch.bfloat16 and _relative_norm_error(a.grad, b.grad) < 2e-2, name


def test_relative_table_depends_on_offset_only():
    rel = torch.randn(2 * 4 - 1, 3)  # offsets -3..3
    small, large = relative_table(rel, 3), relative_table(rel, 6)
    for i in range(3):
        for j in range(3):
            assert torch.equal(small[i, j], rel[j - i + 3])
            assert torch.equal(large[i + 2, j + 2], rel[j - i + 3])
    # Offsets beyond the table clip to its last row on their side.
    assert torch.equal(large[0, 5], rel[-1]) and torch.equal(large[5, 0], rel[0])


@pytest.mark.parametrize("impl", ["naive", "fused", "flex", "auto"])
def test_tables_of_another_size_than_the_map(impl):
    """A table longer than the map: its central rows serve; shorter: offsets beyond it take its edge rows."""
    q, k, v, _, _ = random_inputs(1, 2, 3, 4, 3, 2, relative=False)
    rel_h, rel_w = torch.randn(2 * 10 - 1, 3), torch.randn(2 * 10 - 1, 3)
    out = relative_attention_2d(q, k, v, rel_h, rel_w, impl=impl)
    ref = brute_force(q, k, v, rel_h[10 - 3 : 10 + 2], rel_w[10 - 4 : 10 + 3])
    assert (out.double() - ref).abs().max() < 1e-5
    short_h, short_w = torch.randn(2 * 2 - 1, 3), torch.randn(2 * 3 - 1, 3)  # offsets up to +-1 and +-2
    out = relative_attention_2d(q, k, v, short_h, short_w, impl=impl)
    ref = brute_force(q, k, v, short_h[[0, 0, 1, 2, 2]], short_w[[0, 0, 1, 2, 3, 4, 4]])
    assert (out.double() - ref).abs().max() < 1e-5


def test_bad_arguments_raise():
    q, k, v, rel_h, rel_w = random_inputs(1, 1, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="impl"):
        relative_attention_2d(q, k, v, rel_h, rel_w, impl="flash")
    with pytest.raises(ValueError, match="together"):
        relative_attention_2d(q, k, v, rel_h, None)
    with pytest.raises(ValueError, match="dkh"):
        relative_attention_2d(q, k, v, rel_h[:, :2], rel_w[:, :2])


@pytest.mark.parametrize("old_side, new_side", [(4, 7), (7, 4), (5, 5), (1, 3), (3, 1)])
def test_resized_table_gives_every_offset_the_same_embedding(old_side, new_side):
    from aa_detection.layers.relative_logits import resize_relative_table

    rel = torch.randn(2 * old_side - 1, 3)
    resized = resize_relative_table(rel, 2 * new_side - 1)
    assert resized.shape == (2 * new_side - 1, 3)
    # maps up to the new side: the same per (query, key) embeddings, clipping included when growing
    for size in range(1, new_side + 1):
        assert torch.equal(relative_table(resized, size), relative_table(rel, size))
    if new_side >= old_side:  # growing loses nothing: equal on maps of any size
        assert torch.equal(relative_table(resized, 3 * new_side), relative_table(rel, 3 * new_side))
