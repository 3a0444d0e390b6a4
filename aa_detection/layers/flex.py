"""The FlexAttention path (CUDA): the relative logits added by a score_mod, compiled, its outputs checked.

`FLEX_STATE` holds what the process has learned about the compiled FlexAttention (a failure, the input
signatures whose output passed the check); `relative_attention` reads it to choose "flex" for "auto".
"""
import contextlib
from functools import lru_cache
import math
from typing import Optional
import warnings

import torch

from .naive import NAIVE_MAX_PIXELS
from .relative_logits import AttentionBackendError, autocast_off, flat_padded, relative_logits, upcast

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:
    _flex_attention = None

__all__ = ["FLEX_CHECK_ROWS", "FLEX_CHECK_TOLERANCE", "FLEX_STATE", "FlexState", "attend", "flex_available"]


class FlexState:
    """What this process has learned about the compiled FlexAttention, in one place:

    - `failed`: a compile error or a refused output happened once; "auto" uses the fused path from then on;
    - `signatures`: {input signature: whether its output passed the check since the last compile}. A
      compile (a dynamic graph after the first, static, size) may make the new graph serve the signatures
      seen before it too, so each of those is checked once more.

    `reset()` forgets both (a fresh process's state; tests call it)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.failed = False
        self.signatures = {}


FLEX_STATE = FlexState()


def flex_available(device: torch.device) -> bool:
    """True when FlexAttention can serve `impl="auto"` on this device: CUDA, a torch that has it, and no
    compile failure seen in this process."""
    return device.type == "cuda" and _flex_attention is not None and not FLEX_STATE.failed


@lru_cache(maxsize=1)
def _compiled_torch_flex():
    return torch.compile(_flex_attention, dynamic=None)


def _padded_width(n):
    """FlexAttention's kernels want head widths of at least 16 and a power of two: zero columns added."""
    return max(16, 1 << (n - 1).bit_length())


# Query rows of each new input signature whose compiled FlexAttention output is compared with the exact
# softmax, and the relative error above which it counts as wrong (a miscompile is off by O(1); bf16 and
# TF32 rounding by about 1e-2 at most).
FLEX_CHECK_ROWS = 8
FLEX_CHECK_TOLERANCE = 0.05


def _compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (dynamo's count)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _row_error(out, q, k, v, bias_h, bias_w, scale, width):
    """Relative error of FLEX_CHECK_ROWS query rows of a FlexAttention output against the exact fp32 softmax.

    out, q, k (B, Nh, HW, d), v (B, Nh, HW, dv) as given to FlexAttention; bias_h (B, Nh, HW, H) and
    bias_w (B, Nh, HW, W) the scaled relative logits (or None), `width` the map's W. Costs
    FLEX_CHECK_ROWS / HW of the attention itself."""
    HW = q.shape[2]
    rows = torch.linspace(0, HW - 1, min(FLEX_CHECK_ROWS, HW), device=q.device).round().long().unique()
    with torch.no_grad(), autocast_off(q):
        logits = q[:, :, rows].float() @ k.float().transpose(-1, -2) * scale
        if bias_h is not None:
            keys = torch.arange(HW, device=q.device)
            logits = logits + bias_h[:, :, rows][..., keys // width] + bias_w[:, :, rows][..., keys % width]
        ref = torch.softmax(logits, dim=-1) @ v.float()
        error = (out[:, :, rows].float() - ref).norm() / ref.norm().clamp_min(1e-30)
    return error.item() if error.isfinite() else math.inf


def _out_of_memory(e: BaseException) -> Optional[torch.cuda.OutOfMemoryError]:
    """The CUDA out-of-memory error that `e` is or that torch.compile wrapped in it (a compile error keeps
    it as `inner_exception`, others as their cause); None if there is none."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def _backward_compiled_with_forward():
    """torch's switch (where it has one) that compiles the backward graph together with the forward: a
    backward that fails to compile then fails in the forward call, where the fused path can still take
    over, instead of at loss.backward() (for dynamic shapes torch would only log it until then)."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _compiled_call(q, k, v, score_mod, layer):
    """The compiled FlexAttention call with `score_mod` (which scales the scores itself), (B, Nh, L, d) ->
    (B, Nh, L, dv), never silently dense: torch runs it uncompiled, building the whole (L, L) scores, once
    its compile cache for flex_attention is full (`torch._dynamo.config.recompile_limit`), which is an
    AttentionBackendError here, as is any other failure of the call, its backward's compilation included
    (running out of GPU memory is raised as it is)."""
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), _backward_compiled_with_forward():
            return _compiled_torch_flex()(q, k, v, score_mod=score_mod, scale=1.0)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise AttentionBackendError(
            f"{layer}: FlexAttention reached torch._dynamo.config.recompile_limit "
            f"({torch._dynamo.config.recompile_limit} compiled input signatures); beyond it torch would run it "
            "uncompiled, building the dense (HW, HW) scores. Raise the limit or use MODEL.AA.IMPL 'fused'") from e
    except Exception as e:  # dynamo, Inductor or Triton, compiling or at the first launch
        out_of_memory = _out_of_memory(e)
        if out_of_memory is e:
            raise
        if out_of_memory is not None:
            raise out_of_memory
        cause = getattr(e, "inner_exception", None) or e  # what a backend compiler raised, as dynamo keeps it
        first_line = next((line for line in str(cause).splitlines() if line.strip()), "")
        raise AttentionBackendError(
            f"{layer}: torch {torch.__version__} failed to compile or run FlexAttention for {q.shape[2]} pixels "
            f"with padded query/key width {q.shape[-1]} and value width {v.shape[-1]} ({q.dtype}, "
            f"{q.device.type}): {type(cause).__name__}, {first_line}. Use MODEL.AA.IMPL 'fused'") from e


@lru_cache(maxsize=64)
def _scalar_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim fp32 tensor holding `value` (cached, so created outside inference mode)."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=torch.float32, device=device)


def _operands(q, k, v, rel_h, rel_w, scale):
    """FlexAttention's operands for q, k (B, Nh, H, W, dkh) and v (B, Nh, H, W, dvh): q, k (B, Nh, HW, dq) and
    v (B, Nh, HW, dv) zero-padded to `_padded_width`, the score_mod (to call with FlexAttention's scale 1) that
    scales q.k and adds the relative logits, precomputed (fp32, scaled) as bias_h (B, Nh, HW, H) and
    bias_w (B, Nh, HW, W) (None without tables).

    The scale reaches the score_mod as a 0-dim tensor: torch.compile specializes on a float's value, so
    with FlexAttention's `scale` argument each stage's head width compiled graphs of its own, and a
    training with evaluation went past the recompile limit of 8 (at most 4 graphs with the tensor)."""
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    scale_tensor = _scalar_tensor(scale, q.device)
    bias_h = bias_w = None
    if rel_h is None:
        def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, query: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
            return score * scale_tensor
    else:
        logits_h, logits_w = relative_logits(upcast(q), rel_h, rel_w)
        bias_h = (logits_h * scale).reshape(B, Nh, H * W, H)
        bias_w = (logits_w * scale).reshape(B, Nh, H * W, W)

        def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, query: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
            return score * scale_tensor + bias_h[b, h, query, key // W] + bias_w[b, h, query, key % W]

    q, k = (flat_padded(t, _padded_width(dkh)) for t in (q, k))
    return q, k, flat_padded(v, _padded_width(dvh)), score_mod, bias_h, bias_w


def attend(q, k, v, rel_h, rel_w, scale, layer="attention", compiled=None):
    """FlexAttention with a score_mod adding the relative logits of each query, precomputed (fp32, scaled)
    as (B, Nh, HW, H) and (B, Nh, HW, W): no (HW, HW) tensor, no padded logit width.

    Compiled where `compiled` (default: on CUDA); the first output of each input signature, and again after
    each compile, is checked on FLEX_CHECK_ROWS query rows against the exact softmax, and a wrong one (a
    miscompile) is an AttentionBackendError. Uncompiled it builds dense scores: a reference, capped at
    NAIVE_MAX_PIXELS. Training (a backward) needs CUDA."""
    if _flex_attention is None:
        raise AttentionBackendError(f"{layer}: impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    B, Nh, H, W, _ = q.shape
    dtype, dv = v.dtype, v.shape[-1]
    compiled = q.device.type == "cuda" if compiled is None else compiled
    if not compiled and H * W > NAIVE_MAX_PIXELS:
        raise AttentionBackendError(
            f"{layer}: impl='flex' off CUDA runs FlexAttention eagerly, which builds the dense scores; "
            f"a {H}x{W} map is above NAIVE_MAX_PIXELS={NAIVE_MAX_PIXELS}: use 'kernel' or 'fused' there")
    if (q.device.type != "cuda" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (q, k, v, rel_h, rel_w))):
        raise AttentionBackendError(f"{layer}: impl='flex' trains on CUDA only (FlexAttention has no CPU backward); "
                                    "use 'kernel' or 'fused' for training on the CPU")
    with autocast_off(q):
        if not compiled:
            q, k, v = upcast(q), upcast(k), upcast(v)
        q, k, v, score_mod, bias_h, bias_w = _operands(q, k, v, rel_h, rel_w, scale)
        if compiled:
            graphs = _compiled_graphs()
            out = _compiled_call(q, k, v, score_mod, layer)
            if _compiled_graphs() != graphs:
                FLEX_STATE.signatures.update(dict.fromkeys(FLEX_STATE.signatures, False))
            signature = (q.device.type, q.dtype, B, Nh, H, W, q.shape[-1], v.shape[-1], torch.is_grad_enabled(),
                         *(t is not None and t.requires_grad for t in (q, k, v, bias_h)), rel_h is not None)
            if not FLEX_STATE.signatures.get(signature, False):
                error = _row_error(out, q, k, v, bias_h, bias_w, scale, W)
                if not error <= FLEX_CHECK_TOLERANCE:
                    raise AttentionBackendError(
                        f"{layer}: the compiled FlexAttention output differs from the exact softmax on a {H}x{W} "
                        f"map ({q.dtype}, relative error {error:.3g} on {min(FLEX_CHECK_ROWS, H * W)} query "
                        f"rows): a miscompile of torch {torch.__version__}; use MODEL.AA.IMPL 'fused'")
                FLEX_STATE.signatures[signature] = True
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = _flex_attention(q, k, v, score_mod=score_mod, scale=1.0)
    return out[..., :dv].to(dtype)
