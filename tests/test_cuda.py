"""The CUDA attention paths against the naive reference, and the AA-R50 training memory target.

Skipped without a GPU; run them on one with `python -m pytest -q tests/test_cuda.py`."""
import os

import pytest
import torch

from aa_detection.layers import relative_attention as ra
from aa_detection.layers import relative_attention_2d

from test_relative_attention import random_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (B, Nh, H, W, dkh, dvh): odd non-square, a 1xN strip, AA-R50 res5 widths on a res5-sized map, and
# res4 widths on a map above NAIVE_MAX_PIXELS.
SHAPES = [(2, 8, 7, 11, 3, 2), (2, 4, 1, 33, 6, 3), (2, 8, 25, 42, 13, 6), (1, 8, 50, 84, 6, 3)]


@pytest.fixture(autouse=True)
def fresh_flex(monkeypatch):
    """Each test compiles FlexAttention afresh: the graphs of earlier tests (two dtypes, batch 1, a 1xN strip)
    would otherwise add up towards torch._dynamo's recompile limit, past which flex is refused."""
    torch._dynamo.reset()
    monkeypatch.setattr(ra, "_FLEX_SIGNATURES", {})
    monkeypatch.setattr(ra, "_FLEX_FAILED", False)


def _cuda_inputs(shape, dtype):
    """q, k, v in `dtype` and fp32 tables (parameters stay fp32 under autocast), all requiring grad."""
    torch.manual_seed(0)
    q, k, v, rel_h, rel_w = random_inputs(*shape)
    return [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)] + [t.cuda().requires_grad_() for t in (rel_h, rel_w)]


def _relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["flex", "fused"])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_match_naive(shape, impl, dtype):
    inputs = _cuda_inputs(shape, dtype)
    reference_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = torch.randn(*shape[:4], shape[5], device="cuda", dtype=torch.float64)
    ref = relative_attention_2d(*reference_inputs, impl="naive")
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out)
    out = relative_attention_2d(*inputs, impl=impl)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    assert out.dtype == dtype
    # fp32: only summation order differs; bf16: the output's and the gradients' own rounding (8 bits)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert _relative_error(out, ref) < tolerance
    for name, g, r in zip("q k v rel_h rel_w".split(), grads, ref_grads):
        assert _relative_error(g, r) < 5 * tolerance, name


def test_flex_stays_compiled_and_exact_across_multi_scale_map_sizes():
    """Multi-scale training shows each layer many map sizes. Ten res3-sized maps in one process (more than
    torch._dynamo's default recompile limit of 8), bf16 with gradients: explicit `flex` serves every one
    (a miscompile or a full compile cache would be an AttentionBackendError) and matches the fused path."""
    for i in range(10):
        shape = (2, 4, 80 + 4 * (i % 5), 100 + 8 * i, 3, 2)
        inputs = _cuda_inputs(shape, torch.bfloat16)
        reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
        grad_out = torch.randn(*shape[:4], shape[5], device="cuda")
        out = relative_attention_2d(*inputs, impl="flex")
        grads = torch.autograd.grad(out, inputs, grad_out.bfloat16())
        ref = relative_attention_2d(*reference_inputs, impl="fused")
        ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out)
        assert _relative_error(out, ref) < 1e-2, shape
        for name, g, r in zip("q k v rel_h rel_w".split(), grads, ref_grads):
            assert _relative_error(g, r) < 5e-2, (shape, name)


def _training_batch(height, width, device):
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        corners = torch.rand(8, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        boxes = torch.cat([corners, corners + torch.tensor([width / 4, height / 4])], dim=1)
        instances = Instances((height, width), gt_boxes=Boxes(boxes),
                              gt_classes=torch.randint(0, 80, (8,), generator=generator))
        batch.append({"image": image.to(device), "height": height, "width": width,
                      "instances": instances.to(device)})
    return batch


def _training_step_peak_bytes(config, height, width, device="cuda"):
    """Peak CUDA memory of one RetinaNet training step (batch 2, fp16 autocast as SOLVER.AMP), after a
    warm-up step (FlexAttention compiles there)."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from aa_detection.config import setup_cfg

    cfg = setup_cfg(os.path.join(ROOT, "configs", config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    model = build_model(cfg).train()
    batch = _training_batch(height, width, device)
    peak = 0
    for step in range(2):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with EventStorage(step), torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
            losses = model(batch)
        sum(losses.values()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
    del model, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak


def test_aa_r50_training_step_memory_within_1_3x_of_r50(monkeypatch):
    """AA-R50 (res3-res5, the shipped config) against R-50 RetinaNet at 800x1333, batch 2, AMP, one process,
    its attention served by FlexAttention (auto's choice on CUDA)."""
    flex, flex_calls = ra._IMPLEMENTATIONS["flex"], []

    def counted_flex(*args):
        flex_calls.append(args[-1])  # the layer's name
        return flex(*args)

    monkeypatch.setitem(ra._IMPLEMENTATIONS, "flex", counted_flex)
    baseline = _training_step_peak_bytes("retinanet_R_50_FPN_1x.yaml", 800, 1344)
    augmented = _training_step_peak_bytes("retinanet_AA_R_50_FPN_1x.yaml", 800, 1344)
    print(f"training step peak: R50 {baseline / 2**30:.2f} GiB, AA-R50 {augmented / 2**30:.2f} GiB, "
          f"ratio {augmented / baseline:.3f}")
    assert flex_calls and not ra._FLEX_FAILED  # FlexAttention served the AA layers, not the fused fallback
    assert augmented <= 1.3 * baseline
