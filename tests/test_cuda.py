"""The CUDA attention paths against the naive reference (fp32, fp16 and bf16), flex against fused at the
layer and the backbone level, no dense (HW, HW) allocation at res3, and the AA-R50 training memory target.

Skipped without a GPU; run them on one with `python -m pytest -q tests/test_cuda.py` (tools/gpu_check.py
runs them with the rest of the GPU check)."""
import copy
import os

import pytest
import torch

from aa_detection.layers import relative_attention as ra
from aa_detection.layers import relative_attention_2d
from aa_detection.layers.flex import FLEX_STATE

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
    monkeypatch.setattr(FLEX_STATE, "signatures", {})
    monkeypatch.setattr(FLEX_STATE, "failed", False)


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


# fp16 and bf16 inputs against the fp32 naive reference on the same (unrounded) values. Every path computes
# the logits and the softmax in fp32 (flex rounds the probabilities to the input dtype for p.v, and in
# backward the score gradients for dq and dk), so what separates it from the reference is rounding: q, k, v
# and the output gradient rounded to the dtype (unit roundoff u = 2^-11 for fp16, 2^-8 for bf16), the output
# and the gradients rounded again. A float64 emulation of exactly these roundings on LOW_PRECISION_SHAPE gave
# relative errors (Frobenius norm) of 1.1u to 1.4u on the output and on each gradient; 5u leaves room for
# the order of the fp32 sums and flex's own rescaling, while a wrong path (an offset off by one, a
# miscompile) is off by O(1).
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
LOW_PRECISION_SHAPE = (2, 8, 25, 42, 13, 6)  # res5 widths on a res5 map, above NAIVE_MAX_PIXELS: "auto" is flex


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["naive", "fused", "flex", "auto"])
def test_low_precision_matches_fp32_naive(impl, dtype):
    shape = LOW_PRECISION_SHAPE
    reference_inputs = _cuda_inputs(shape, torch.float32)
    inputs = [t.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(reference_inputs)]
    grad_out = torch.randn(*shape[:4], shape[5], device="cuda")
    ref = relative_attention_2d(*reference_inputs, impl="naive")
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out)
    out = relative_attention_2d(*inputs, impl=impl)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    if impl == "auto":  # served by FlexAttention, not by the fused fallback
        assert ra.choose_impl(out.device, *shape[2:4], shape[4], shape[5], dtype) == "flex" and not FLEX_STATE.failed
    tolerance = 5 * UNIT_ROUNDOFF[dtype]
    assert out.dtype == dtype and _relative_error(out, ref) < tolerance
    for name, g, r in zip("q k v rel_h rel_w".split(), grads, ref_grads):
        assert _relative_error(g, r) < tolerance, name


def test_flex_allocates_no_dense_matrix_at_res3():
    """A flex training call (forward and backward) on the full res3 map of an 800x1333 input (100x167, batch
    2, 8 heads, AA-R50's res3 widths, bf16) allocates nothing as large as one (HW, HW) bf16 matrix (558 MB),
    let alone the (B, Nh, HW, HW) logits: every CUDA allocation of the second call (the first compiles) is
    read from the caching allocator's history."""
    from aa_detection.benchmark.attention import SIZES, make_inputs
    from aa_detection.layers import attention_depths

    if not hasattr(torch.cuda.memory, "_record_memory_history"):
        pytest.skip(f"torch {torch.__version__} cannot record the CUDA allocator's history")
    H, W, fout = SIZES["res3"]
    dk, dv = attention_depths(fout, 8, 0.2, 0.1)
    inputs, grad_out = make_inputs(2, 8, H, W, dk // 8, dv // 8, torch.device("cuda"), "bf16")
    leaves = [t.requires_grad_() for t in inputs]

    def train_call():
        out = relative_attention_2d(*leaves, impl="flex")
        torch.autograd.grad(out, leaves, grad_out)
        torch.cuda.synchronize()

    train_call()
    torch.cuda.memory._record_memory_history(enabled="all", context=None, max_entries=100000)
    try:
        train_call()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    sizes = [event["size"] for trace in snapshot["device_traces"] for event in trace if event["action"] == "alloc"]
    dense = (H * W) ** 2 * torch.finfo(torch.bfloat16).bits // 8
    assert sizes, "no allocation recorded"
    assert max(sizes) < dense, f"largest allocation {max(sizes) >> 20} MiB, one (HW, HW) matrix {dense >> 20} MiB"


def _without_tf32(monkeypatch):
    """fp32 convolutions and matmuls in full fp32: with TF32 (10-bit mantissas) the rounding of every later
    layer would turn the two paths' last-bit differences into differences of about 1e-3."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# flex against fused, both given the same inputs. In fp32 both are exact up to fp32 rounding: the naive and
# fused backbones differ by 1.3e-6 at every FPN output (CPU, 256x384), so 1e-4 is far above rounding and far
# below a wrong path. Under bf16 autocast the fused path computes in fp32 while flex rounds its probabilities
# to bf16 (about 1.3u on its own output, see above): 5u for one layer. In the backbone the bf16 layers after
# each attention round differently once their inputs differ: an emulation on the CPU (the fused path's output
# given a relative noise of 1.3u) moved every FPN output by 1.0e-2 to 1.1e-2 (2.6u to 2.8u), so 10u there.
U_BF16 = UNIT_ROUNDOFF[torch.bfloat16]
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5 * U_BF16}
BACKBONE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 10 * U_BF16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_layer_matches_fused(dtype, monkeypatch):
    """An AAConv2d at res4 of an 800x1333 input (50x84, 256 channels, 8 heads, kappa 0.2, upsilon 0.1),
    under autocast for bf16: the output and the gradients of the input and of every parameter."""
    from aa_detection.layers import AAConv2d

    _without_tf32(monkeypatch)
    flex = AAConv2d(256, 256, num_heads=8, max_relative_size=84, impl="flex").cuda()
    fused = copy.deepcopy(flex)
    fused.impl = "fused"
    x = torch.randn(2, 256, 50, 84, device="cuda")
    grad_out = torch.randn(2, 256, 50, 84, device="cuda")
    results = []
    for layer in (flex, fused):
        leaves = [x.clone().requires_grad_(), *layer.parameters()]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = layer(leaves[0])
        results.append((out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))))
    (out, grads), (ref, ref_grads) = results
    tolerance = LAYER_TOLERANCE[dtype]
    assert _relative_error(out, ref) < tolerance
    names = ["input"] + [name for name, _ in flex.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert _relative_error(g, r) < tolerance, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backbone_matches_fused(dtype, monkeypatch):
    """The AA-R50 FPN backbone of configs/retinanet_AA_R_50_FPN_1x.yaml (13 attention layers in res3-res5,
    same weights) on two 512x768 images, inference, under autocast for bf16: every FPN output."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
    from detectron2.modeling import build_backbone

    from aa_detection.config import setup_cfg

    _without_tf32(monkeypatch)
    backbones = {}
    for impl in ("flex", "fused"):
        cfg = setup_cfg(os.path.join(ROOT, "configs", "retinanet_AA_R_50_FPN_1x.yaml"),
                        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda", "MODEL.AA.IMPL", impl])
        backbones[impl] = build_backbone(cfg).cuda().eval()
    backbones["fused"].load_state_dict(backbones["flex"].state_dict())
    images = torch.randn(2, 3, 512, 768, device="cuda") * 50
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        outputs = {impl: backbone(images) for impl, backbone in backbones.items()}
    assert not FLEX_STATE.failed
    for name, ref in outputs["fused"].items():
        assert _relative_error(outputs["flex"][name], ref) < BACKBONE_TOLERANCE[dtype], name


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
    flex, flex_calls = ra.PATHS["flex"], []

    def counted_flex(*args):
        flex_calls.append(args[-1])  # the layer's name
        return flex(*args)

    monkeypatch.setitem(ra.PATHS, "flex", counted_flex)
    baseline = _training_step_peak_bytes("retinanet_R_50_FPN_1x.yaml", 800, 1344)
    augmented = _training_step_peak_bytes("retinanet_AA_R_50_FPN_1x.yaml", 800, 1344)
    print(f"training step peak: R50 {baseline / 2**30:.2f} GiB, AA-R50 {augmented / 2**30:.2f} GiB, "
          f"ratio {augmented / baseline:.3f}")
    assert flex_calls and not FLEX_STATE.failed  # FlexAttention served the AA layers, not the fused fallback
    assert augmented <= 1.3 * baseline

