"""How `impl="auto"` picks a path, the fused path's memory-lean SDPA call, FlexAttention's fallback and
mixed precision, on the CPU (the CUDA side of the same rules is in test_cuda.py)."""
import functools
import math
import re
import warnings

import pytest
import torch
from torch._inductor.exc import InductorError

from aa_detection.analysis import flop_count
from aa_detection.layers import AAConv2d, relative_attention_2d
from aa_detection.layers import flex, fused, kernel, naive, relative_attention as ra
from aa_detection.layers.relative_logits import AttentionBackendError, relative_logits, split_heads

from test_relative_attention import brute_force, random_inputs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # choose_impl reads the device type only


@pytest.fixture
def attention_log(listen_to):
    """caplog receiving the attention module's records."""
    return listen_to(ra.logger.name)


@pytest.mark.skipif(not kernel.kernel_available(), reason="aa_detection._C is not built")
def test_auto_on_the_cpu_takes_the_kernel_only_within_its_limits():
    widest = kernel.KERNEL_MAX_HEAD_WIDTH
    assert ra.choose_impl(CPU, 100, 168, 3, 2) == "kernel"
    assert ra.choose_impl(CPU, 2, 3, widest, widest) == "kernel"
    assert ra.choose_impl(CPU, 2, 3, widest + 1, 2) == "naive"
    assert ra.choose_impl(CPU, 25, 42, 2, widest + 1) == "fused"
    assert ra.choose_impl(CPU, 25, 42, 3, 2, torch.float64) == "fused"


def test_auto_without_the_kernel_uses_the_pixel_threshold(monkeypatch):
    monkeypatch.setattr(kernel, "_C", None)
    side = math.isqrt(naive.NAIVE_MAX_PIXELS)
    assert ra.choose_impl(CPU, side, side, 3, 2) == "naive"
    assert ra.choose_impl(CPU, side, side + 1, 3, 2) == "fused"


def test_auto_on_cuda_takes_flex_unless_it_failed(monkeypatch):
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    assert ra.choose_impl(CUDA, 100, 168, 3, 2) == "flex"
    assert ra.choose_impl(CUDA, 100, 168, 3, 2, torch.bfloat16) == "flex"
    assert ra.choose_impl(CUDA, 16, 16, 3, 2) == "naive"
    monkeypatch.setattr(flex.FLEX_STATE, "failed", True)
    assert ra.choose_impl(CUDA, 100, 168, 3, 2) == "fused"
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    monkeypatch.setattr(flex, "_flex_attention", None)  # a torch without FlexAttention
    assert ra.choose_impl(CUDA, 100, 168, 3, 2) == "fused"


def test_auto_never_crashes_on_heads_wider_than_the_kernel():
    """One head on AA-R50's res5 widths (dkh 102, dvh 51): auto equals the naive reference."""
    torch.manual_seed(0)
    layer = AAConv2d(64, 512, num_heads=1, kappa=0.2, upsilon=0.1, max_relative_size=17)
    assert layer.key_depth > kernel.KERNEL_MAX_HEAD_WIDTH
    for size in (5, 17):  # below and above NAIVE_MAX_PIXELS: auto takes naive, then fused
        x = torch.randn(1, 64, size, size)
        out = layer(x)
        for reference in ("naive", "fused"):
            layer.impl = reference
            ref = layer(x)
            assert (out - ref).abs().max() < 1e-4 * ref.abs().max(), (size, reference)
        layer.impl = "auto"


@pytest.mark.parametrize("key_width, value_width", [(3, 2), (3 + 100 + 168, 6), (13, 13), (8, 64), (1, 1)])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_fused_widths_meet_the_alignment_rule(key_width, value_width, device_type):
    qk, v = fused.fused_widths(key_width, value_width, device_type)
    assert qk % fused.SDPA_ALIGNMENT == 0 and v % fused.SDPA_ALIGNMENT == 0
    assert key_width <= qk and value_width <= v
    if device_type == "cpu":  # one width for q, k and v: the wider side's, aligned
        assert qk == v < max(key_width, value_width) + fused.SDPA_ALIGNMENT
    else:  # each side aligned on its own
        assert qk < key_width + fused.SDPA_ALIGNMENT and v < value_width + fused.SDPA_ALIGNMENT


def test_fused_path_never_falls_back_to_dense_attention():
    """Inputs no memory-lean backend takes (the CPU flash kernel wants one width for q, k and v) are an
    error naming the layer, the pixels and the widths, not a silent dense (HW, HW) computation."""
    q = torch.randn(1, 2, 300, 16)
    with pytest.raises(AttentionBackendError, match=r"res3\.0\.conv2.*300 pixels.*width 16.*value width 8"):
        fused.memory_lean_sdpa(q, q, torch.randn(1, 2, 300, 8), 0.25, "res3.0.conv2")


def test_fused_path_takes_widths_that_need_no_zero_columns():
    """Head widths already aligned (8 for q, k and v without relative logits, whose concatenation copies q and
    k) leave split_heads' strided views unpadded: the operands are still made contiguous, which the
    memory-lean kernels need."""
    torch.manual_seed(0)
    layer = AAConv2d(16, 32, num_heads=2, key_depth=16, value_depth=16, relative=False, impl="fused").eval()
    naive = AAConv2d(16, 32, num_heads=2, key_depth=16, value_depth=16, relative=False, impl="naive").eval()
    naive.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 10, 12)
    with torch.no_grad():
        assert (layer(x) - naive(x)).abs().max() < 1e-5
    q, k, v = split_heads(torch.randn(1, 3 * 32, 5, 7), 2, 32, 32)  # head widths 16: FlexAttention's own
    assert all(t.stride(-1) == 1 for t in flex._operands(q, k, v, None, None, 0.25)[:3])


def test_flex_off_cuda_refuses_large_maps_and_training_and_auto_falls_back_to_fused(monkeypatch, attention_log):
    inputs = random_inputs(1, 2, 17, 17, 3, 2)
    with pytest.raises(AttentionBackendError, match="res4.1.conv2.*17x17"):
        relative_attention_2d(*inputs, impl="flex", layer="res4.1.conv2")
    for trained in range(5):  # any one of q, k, v, rel_h, rel_w
        small = list(random_inputs(1, 2, 3, 4, 3, 2))
        small[trained].requires_grad_()
        with pytest.raises(AttentionBackendError, match="trains on CUDA only"):
            relative_attention_2d(*small, impl="flex")
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    out = ra._attend("flex", *inputs, layer="res4.1.conv2", auto=True)  # as auto would on a failing GPU
    assert flex.FLEX_STATE.failed and "FlexAttention failed" in attention_log.text
    ref = relative_attention_2d(*inputs, impl="naive")
    assert (out - ref).abs().max() < 1e-5


# Map sizes in the order a multi-scale run meets them: the second makes torch recompile FlexAttention with
# dynamic shapes, which later sizes reuse; then a 1xN strip and another head count.
COMPILED_FLEX_SHAPES = [(1, 2, 8, 12, 3, 2), (1, 2, 8, 16, 3, 2), (2, 2, 9, 16, 6, 3), (1, 2, 13, 21, 3, 2),
                        (1, 3, 1, 33, 6, 3)]


def _compiled_flex(inputs, layer="attention"):
    """FlexAttention compiled as on CUDA (forward only on the CPU), (B, Nh, H, W, dvh)."""
    q, v = inputs[0], inputs[2]
    with torch.no_grad():
        return flex.attend(*inputs, 1.0 / math.sqrt(q.shape[-1]), layer, compiled=True).reshape(v.shape)


def test_compiled_flex_is_exact_or_refused_at_every_map_size(monkeypatch):
    """The compiled FlexAttention never returns wrong values: each new input signature is checked against
    the exact softmax, and a miscompile or a failed compile is an error naming the layer and the map
    (torch 2.14.1's CPU kernel fails to build, or gives wrong values, once it compiles with dynamic
    shapes; the first, static, size is served)."""
    torch._dynamo.reset()  # the first size compiles static
    monkeypatch.setattr(flex.FLEX_STATE, "signatures", {})
    served = []
    for shape in COMPILED_FLEX_SHAPES:
        B, Nh, H, W = shape[:4]
        inputs = random_inputs(*shape)
        ref = relative_attention_2d(*(t.double() for t in inputs), impl="naive")
        try:
            out = _compiled_flex(inputs, "res3.0.conv2")
        except AttentionBackendError as e:
            assert re.match(f"res3.0.conv2: (the compiled FlexAttention output differs from the exact softmax on "
                            f"a {H}x{W} map|torch .* failed to compile or run FlexAttention for {H * W} pixels)",
                            str(e))
            continue
        assert (out.double() - ref).abs().max() < 1e-5
        served.append(shape)
    assert COMPILED_FLEX_SHAPES[0] in served


def _eager_flex_times(factor):
    """A stand-in for the compiled call: FlexAttention run eagerly, its output scaled by `factor`."""
    def call(q, k, v, score_mod, layer):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex._flex_attention(q, k, v, score_mod=score_mod, scale=1.0) * factor
    return call


def test_flex_checks_each_new_signature_once_and_auto_answers_a_wrong_output_with_fused(monkeypatch, attention_log):
    inputs = random_inputs(1, 2, 5, 7, 3, 2)
    ref = relative_attention_2d(*inputs, impl="naive")
    monkeypatch.setattr(flex.FLEX_STATE, "signatures", {})
    monkeypatch.setattr(flex, "_compiled_call", _eager_flex_times(1.5))
    with pytest.raises(AttentionBackendError, match=r"res3\.1\.conv2: .*differs from the exact softmax on a 5x7"):
        _compiled_flex(inputs, "res3.1.conv2")
    assert not any(flex.FLEX_STATE.signatures.values())  # a refused signature is checked again next time
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    monkeypatch.setitem(ra.PATHS, "flex", functools.partial(flex.attend, compiled=True))  # as on CUDA
    with torch.no_grad():
        out = ra._attend("flex", *inputs, layer="res3.1.conv2", auto=True)
    assert flex.FLEX_STATE.failed and "res3.1.conv2: FlexAttention failed (AttentionBackendError" in attention_log.text
    assert (out - ref).abs().max() < 1e-5  # the fused path's answer
    monkeypatch.setattr(flex, "_compiled_call", _eager_flex_times(1.0))
    assert (_compiled_flex(inputs) - ref).abs().max() < 1e-5 and list(flex.FLEX_STATE.signatures.values()) == [True]
    monkeypatch.setattr(flex, "_compiled_call", _eager_flex_times(1.5))
    _compiled_flex(inputs)  # a signature that passed is not checked again (the check costs 8 rows once)
    with pytest.raises(AttentionBackendError):  # a new map size is
        _compiled_flex(random_inputs(1, 2, 6, 7, 3, 2))


def test_after_a_compile_every_signature_is_checked_again(flex_compiled_with, monkeypatch):
    """A recompile (dynamic shapes after the first, static, size) makes the new graph serve the sizes checked
    before it, too. Here FlexAttention runs through torch.compile's front end with a backend whose second graph
    is wrong (as torch 2.14.1's CPU kernel is once dynamic): the static size passes, the dynamic graph then
    serves it wrongly, which the check catches; a new size served by an existing graph checks only itself."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def wrong_after_the_first_graph(gm, example_inputs):
        graphs.append(gm)
        run = lookup_backend("aot_eager")(gm, example_inputs)
        return run if len(graphs) == 1 else lambda *args: [t * 1.5 for t in run(*args)]

    flex_compiled_with(wrong_after_the_first_graph)
    row_error, checks = flex._row_error, []

    def counted_row_error(out, *args):
        checks.append(tuple(out.shape))
        return row_error(out, *args)

    monkeypatch.setattr(flex, "_row_error", counted_row_error)
    first, second, third = (random_inputs(1, 2, H, 7, 3, 2) for H in (5, 6, 8))
    _compiled_flex(first)
    _compiled_flex(first)
    assert len(graphs) == 1 and len(checks) == 1  # the static graph, checked once
    with pytest.raises(AttentionBackendError, match="differs from the exact softmax on a 6x7"):
        _compiled_flex(second)  # the dynamic graph compiles
    with pytest.raises(AttentionBackendError, match="differs from the exact softmax on a 5x7"):
        _compiled_flex(first)  # now served by it: checked again
    with pytest.raises(AttentionBackendError, match="on a 8x7"):
        _compiled_flex(third)
    assert len(graphs) == 2 and len(checks) == 4


def _compiled_flex_raising(error):
    """A stand-in for torch.compile(flex_attention) that raises `error` as Inductor does: an InductorError
    holding it as `inner_exception`, raised `from None`."""
    def call(*args, **kwargs):
        raise InductorError(error, None) from None
    return lambda: call


@pytest.mark.parametrize("wrapped", [False, True])
def test_auto_raises_running_out_of_gpu_memory_instead_of_trying_fused(monkeypatch, wrapped):
    """Also when torch.compile wraps it, as an out-of-memory error while compiling (autotuning) comes."""
    error = torch.cuda.OutOfMemoryError("CUDA out of memory")

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    compiled = _compiled_flex_raising(error) if wrapped else lambda: out_of_memory
    monkeypatch.setattr(flex, "_compiled_torch_flex", compiled)
    monkeypatch.setitem(ra.PATHS, "flex", functools.partial(flex.attend, compiled=True))  # as on CUDA
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised, torch.no_grad():
        ra._attend("flex", *random_inputs(1, 2, 5, 7, 3, 2), layer="res3.0.conv2", auto=True)
    assert raised.value is error and not flex.FLEX_STATE.failed


def test_a_failed_flex_compile_is_an_error_naming_the_layer_and_auto_answers_it_with_fused(monkeypatch, attention_log):
    inputs = random_inputs(1, 2, 5, 7, 3, 2)
    monkeypatch.setattr(flex, "_compiled_torch_flex", _compiled_flex_raising(ValueError("cannot lower score_mod")))
    with pytest.raises(AttentionBackendError, match=r"res4\.0\.conv2: torch .* failed to compile or run "
                       r"FlexAttention for 35 pixels with padded query/key width 16 and value width 16 "
                       r"\(torch.float32, cpu\): ValueError, cannot lower score_mod\. "
                       r"Use MODEL\.AA\.IMPL 'fused'"):
        _compiled_flex(inputs, "res4.0.conv2")
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    monkeypatch.setitem(ra.PATHS, "flex", functools.partial(flex.attend, compiled=True))  # as on CUDA
    with torch.no_grad():
        out = ra._attend("flex", *inputs, layer="res4.0.conv2", auto=True)
    assert flex.FLEX_STATE.failed and "res4.0.conv2: FlexAttention failed (AttentionBackendError" in attention_log.text
    assert (out - relative_attention_2d(*inputs, impl="naive")).abs().max() < 1e-5


def test_a_failed_flex_launch_is_an_error_naming_the_layer(monkeypatch):
    """As Triton raises at a kernel's first launch when it needs more shared memory than the GPU has."""
    def launch(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 264192, Hardware limit: 232448")

    monkeypatch.setattr(flex, "_compiled_torch_flex", lambda: launch)
    with pytest.raises(AttentionBackendError, match=r"res5\.1\.conv2: .* FlexAttention for 35 pixels .*: "
                       r"RuntimeError, out of resource: shared memory") as raised:
        _compiled_flex(random_inputs(1, 2, 5, 7, 3, 2), "res5.1.conv2")
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_flex_row_check_catches_a_wrong_map_width():
    """The check's exact rows accept FlexAttention's output and reject attention computed as if the 6x10
    map were 10x6 (what indexing the relative tables with a stale width would give)."""
    torch.manual_seed(0)
    q, k, v, rel_h, rel_w = random_inputs(2, 2, 6, 10, 4, 3)
    scale = 0.5
    logits_h, logits_w = relative_logits(q, rel_h, rel_w)
    bias_h, bias_w = (t.reshape(2, 2, 60, -1) * scale for t in (logits_h, logits_w))
    flat = [t.reshape(2, 2, 60, -1) for t in (q, k, v)]
    out = flex.attend(q, k, v, rel_h, rel_w, scale)
    assert flex._row_error(out, *flat, bias_h, bias_w, scale, 10) < 1e-6
    transposed = [t.reshape(2, 2, 10, 6, -1) for t in (q, k, v)]
    wrong = flex.attend(*transposed, rel_w, rel_h, scale)  # rel_w has the 19 rows a height of 10 needs
    assert flex._row_error(wrong.reshape(out.shape), *flat, bias_h, bias_w, scale, 10) > flex.FLEX_CHECK_TOLERANCE


def test_compiled_flex_past_the_recompile_limit_is_an_error_not_dense_attention(monkeypatch):
    """Past torch._dynamo's recompile limit torch runs FlexAttention uncompiled (dense (HW, HW) scores):
    an AttentionBackendError instead, which auto answers with the fused path."""
    monkeypatch.setattr(flex.FLEX_STATE, "signatures", {})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        _compiled_flex(random_inputs(1, 2, 5, 7, 3, 2))
        with pytest.raises(AttentionBackendError, match=r"res4\.2\.conv2: FlexAttention reached .*recompile_limit"):
            _compiled_flex(random_inputs(1, 2, 6, 7, 3, 2), "res4.2.conv2")


# Map sizes of one layer under multi-scale training: eleven heights and widths.
MULTI_SCALE_SIZES = [(20, 24), (20, 28), (24, 30), (26, 34), (18, 40), (30, 22), (22, 36), (28, 26), (32, 20),
                     (16, 44), (21, 33)]
# (dkh, dvh) of AA-R50's res3, res4 and res5 layers (8 heads): three scales, one padded width.
AA_R50_HEAD_WIDTHS = [(3, 2), (6, 3), (13, 6)]


def test_compiled_flex_serves_many_map_sizes_and_head_widths_with_three_graphs(aot_eager_flex):
    """The project's score_mod compiles at most three times (static, then dynamic sizes) for eleven map sizes
    at AA-R50's three head widths, below the recompile limit of 8, and each output is exact."""
    _, counter = aot_eager_flex
    for rerun in (False, True):  # the rerun checks once more the sizes seen before the last compile
        for i, (H, W) in enumerate(MULTI_SCALE_SIZES):
            inputs = random_inputs(2, 8, H, W, *AA_R50_HEAD_WIDTHS[i % 3])
            ref = relative_attention_2d(*(t.double() for t in inputs), impl="naive")
            assert (_compiled_flex(inputs).double() - ref).abs().max() < 1e-5, (H, W)
        assert counter.frame_count <= 3 and len(flex.FLEX_STATE.signatures) == len(MULTI_SCALE_SIZES)
        assert all(flex.FLEX_STATE.signatures.values()) == rerun  # the first size was served by a later graph


def test_a_backward_that_fails_to_compile_fails_in_the_forward_call(flex_compiled_with):
    """torch compiles a backward graph at the first backward (for dynamic shapes it only logs a failure
    until then), out of reach of auto's fallback: here it is compiled with the forward, so its failure is an
    AttentionBackendError of the forward call."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_compiler(gm, example_inputs):
        raise RuntimeError("cannot lower the backward")

    flex_compiled_with(aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=backward_compiler))
    q, k, v, rel_h, rel_w = random_inputs(1, 2, 5, 7, 3, 2)
    with torch.no_grad():  # no backward to compile
        flex._compiled_call(*flex._operands(q, k, v, rel_h, rel_w, 0.5)[:4], "res4.0.conv2")
    q_flat, k_flat, v_flat, score_mod, _, _ = flex._operands(q, k, v, rel_h.requires_grad_(), rel_w, 0.5)
    with pytest.raises(AttentionBackendError, match=r"res4\.0\.conv2: .*failed to compile or run FlexAttention"
                                                       r".*cannot lower the backward"):
        flex._compiled_call(q_flat, k_flat, v_flat, score_mod, "res4.0.conv2")


def test_compiled_flex_trains_the_tables_then_evaluates_with_four_graphs(aot_eager_flex):
    """A training then an evaluation: the relative tables' gradients through the score_mod's captured logits
    equal naive's (torch's CPU FlexAttention takes no gradient for q, k, v, so only the tables train here) at
    eleven map sizes and AA-R50's three head widths, then batch-1 inference; at most four graphs in all."""
    _, counter = aot_eager_flex
    for i, (H, W) in enumerate(MULTI_SCALE_SIZES):
        dkh, dvh = AA_R50_HEAD_WIDTHS[i % 3]
        q, k, v, rel_h, rel_w = random_inputs(2, 8, H, W, dkh, dvh)
        tables = (rel_h.requires_grad_(), rel_w.requires_grad_())
        q_flat, k_flat, v_flat, score_mod, _, _ = flex._operands(q, k, v, rel_h, rel_w, 1.0 / math.sqrt(dkh))
        out = flex._compiled_call(q_flat, k_flat, v_flat, score_mod, "res3.0.conv2")[..., :dvh].reshape(v.shape)
        ref = relative_attention_2d(q, k, v, rel_h, rel_w, impl="naive")
        grad_out = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(out, tables, grad_out), torch.autograd.grad(ref, tables, grad_out)):
            assert (got - want).abs().max() < 1e-4 * want.abs().max(), (H, W)
        assert (out - ref).abs().max() < 1e-5
    for i, (H, W) in enumerate(MULTI_SCALE_SIZES[:6]):
        inputs = random_inputs(1, 8, H, W, *AA_R50_HEAD_WIDTHS[i % 3])
        assert (_compiled_flex(inputs) - relative_attention_2d(*inputs, impl="naive")).abs().max() < 1e-5
    assert counter.frame_count <= 4


@pytest.mark.parametrize("auto", [False, True])
def test_flex_inside_a_jit_trace_records_the_fused_path(monkeypatch, auto):
    """fvcore's FLOP count (also at the end of every training) and TorchScript trace the model, and
    FlexAttention cannot be traced (compiled on CUDA; its shapes become tensors eagerly): a trace records
    the fused path, which gives the same output. Chosen by auto (as on CUDA), flex is not marked as failed
    by the trace."""
    monkeypatch.setattr(flex.FLEX_STATE, "failed", False)
    if auto:
        monkeypatch.setattr(ra, "choose_impl", lambda *args: "flex")
    torch.manual_seed(0)
    layer = AAConv2d(16, 32, num_heads=2, impl="auto" if auto else "flex").eval()
    naive = AAConv2d(16, 32, num_heads=2, impl="naive").eval()
    naive.load_state_dict(layer.state_dict())
    x = torch.randn(1, 16, 9, 11)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
        assert (traced(x) - naive(x)).abs().max() < 1e-5
        assert (layer(x) - naive(x)).abs().max() < 1e-5
    flop_count(layer, (x,))  # fvcore's trace of the layer (it raised with FlexAttention in the trace)
    assert not flex.FLEX_STATE.failed


def _large_logit_inputs(shape, seed=0):
    """bf16 q, k, v (exact in bf16) whose logits reach about +-40, and fp32 tables: in bf16 those logits
    would carry errors of about 0.1, which move the softmax weights by 10%."""
    torch.manual_seed(seed)
    q, k, v, rel_h, rel_w = random_inputs(*shape)
    return (4 * q).bfloat16(), (4 * k).bfloat16(), v.bfloat16(), rel_h, rel_w


CPU_PATHS = ["naive", "fused", "flex"] + (["kernel"] if kernel.kernel_available() else [])


@pytest.mark.parametrize("impl", CPU_PATHS)
def test_autocast_keeps_logits_and_softmax_in_float32(impl):
    inputs = _large_logit_inputs((2, 2, 5, 7, 16, 4))
    ref = brute_force(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relative_attention_2d(*inputs, impl=impl)
    assert out.dtype == torch.bfloat16
    # only the output's own rounding to bf16 (8 significant bits) is left
    assert ((out.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("impl", CPU_PATHS)
def test_autocast_layer_matches_float32(impl):
    """The whole layer under CPU autocast against fp32: forward (and backward where the path trains on the
    CPU) within bf16's tolerance, output in bf16."""
    torch.manual_seed(0)
    layer = AAConv2d(16, 32, num_heads=4, key_depth=8, value_depth=8, impl=impl)
    layer.requires_grad_(impl != "flex")  # FlexAttention trains on CUDA only
    x = torch.randn(2, 16, 6, 9)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    if impl != "flex":
        grad = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, list(layer.parameters()), grad)
        grads = torch.autograd.grad(out.float(), list(layer.parameters()), grad)
        for g, r in zip(grads, ref_grads):
            assert (g.float() - r).norm() < 0.05 * r.norm()
