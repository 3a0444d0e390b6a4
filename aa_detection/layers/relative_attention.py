"""Multi-head self-attention over a 2D map with relative position logits (Bello et al., 2019).

For query pixel i = (y_i, x_i) and key pixel j = (y_j, x_j) of an H x W map:

    logit_ij = (q_i . k_j + q_i . rel_h[y_j - y_i + H - 1] + q_i . rel_w[x_j - x_i + W - 1]) / sqrt(dkh)
    out_i    = sum_j softmax_j(logit_ij) v_j

The offset is key minus query, the 1/sqrt(dkh) scale covers the relative terms too, and the tables
rel_h (2H-1, dkh) and rel_w (2W-1, dkh) are shared by all heads.
"""
import contextlib
from functools import lru_cache, partial
import logging
import math
from typing import Callable, Optional, Tuple
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from . import kernel
from .kernel import KERNEL_MAX_HEAD_WIDTH, kernel_attention, kernel_available

try:  # FlexAttention (torch >= 2.5): the CUDA path
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:
    _flex_attention = None

__all__ = ["AttentionBackendError", "attention_weights", "choose_impl", "flex_available", "fused_widths",
           "kernel_available", "relative_attention_2d", "relative_attention_qkv", "relative_table",
           "resize_relative_table", "split_heads", "check_impl", "FLEX_STATE", "IMPLS", "PATHS",
           "KERNEL_MAX_HEAD_WIDTH", "NAIVE_MAX_PIXELS", "SDPA_ALIGNMENT"]

logger = logging.getLogger(__name__)


class AttentionBackendError(RuntimeError):
    """An attention path that cannot run these inputs without building the dense (HW, HW) logits."""


# "auto" keeps the dense path up to this many pixels per map where the compiled kernel does not serve
# the layer. On the 2-core CPU, `tools/benchmark_attention.py --sweep` (res5 head widths, batch 2, 8 heads)
# had the dense path faster up to 8x8 maps, mixed at 12x16 (fused faster forward, slower forward+backward)
# and the fused path faster from 16x24 (384 pixels) up.
NAIVE_MAX_PIXELS = 256
# Widths of the fused path's SDPA call are multiples of this: the memory-efficient kernel needs 8 for
# fp16/bf16 and 4 for fp32, flash attention 8.
SDPA_ALIGNMENT = 8
# The scaled_dot_product_attention backends that never build the dense (L, L) matrix.
MEMORY_LEAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


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


def _upcast(t):
    """fp16/bf16 -> fp32 (logits and softmax statistics stay in fp32 under mixed precision); others as they are."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast_off(t):
    """A context with autocast disabled on t's device, so fp32 operands stay fp32."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


@lru_cache(maxsize=256)
def _offset_rows(size: int, table_size: int, device: torch.device) -> torch.Tensor:
    """(size, size) long: row of a (2L-1)-row table holding offset key - query, clipped to +-(L-1).

    Cached per size, so created outside inference mode: a cached inference tensor could not be used
    by a later training step."""
    with torch.inference_mode(False):
        pos = torch.arange(size, device=device)
        offset = (pos[None, :] - pos[:, None]).clamp(-(table_size - 1), table_size - 1)
        return offset + table_size - 1


def relative_table(rel: torch.Tensor, size: int) -> torch.Tensor:
    """Per (query, key) pair embeddings of one axis.

    rel: (2L-1, d), row `o + L - 1` holds offset o = key - query; offsets beyond +-(L-1) take the
    last row on their side. Returns (size, size, d), entry [query, key].
    """
    table_size = (rel.shape[0] + 1) // 2
    return rel[_offset_rows(size, table_size, rel.device)]


def resize_relative_table(rel: torch.Tensor, rows: int) -> torch.Tensor:
    """A (2L-1, d) table as (rows, d), rows = 2L'-1 odd, giving every offset the embedding `rel` gives it
    under the clipping rule: L' < L keeps the centre rows (offsets within +-(L'-1)), L' > L repeats the
    edge rows outward (the rows the smaller table's clipping used for those offsets)."""
    if rows < 1 or rows % 2 == 0:
        raise ValueError(f"a relative table has 2L-1 rows, got {rows}")
    old, new = (rel.shape[0] + 1) // 2, (rows + 1) // 2
    offsets = torch.arange(-(new - 1), new, device=rel.device).clamp(-(old - 1), old - 1)
    return rel[offsets + old - 1]


def _relative_logits(q, rel_h, rel_w):
    """q (B, Nh, H, W, d) -> unscaled relative logits along y (B, Nh, H, W, H) and x (B, Nh, H, W, W)."""
    H, W = q.shape[2:4]
    logits_h = torch.einsum("bnyxd,ykd->bnyxk", q, relative_table(rel_h, H).to(q.dtype))
    logits_w = torch.einsum("bnyxd,xkd->bnyxk", q, relative_table(rel_w, W).to(q.dtype))
    return logits_h, logits_w


def attention_weights(q: torch.Tensor, k: torch.Tensor, rel_h: Optional[torch.Tensor] = None,
                      rel_w: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """The softmax weights, dense: q, k (B, Nh, H, W, dkh) -> (B, Nh, HW, HW), row i for query pixel
    i = y * W + x, summing to one over the keys; scale defaults to 1/sqrt(dkh). The naive path is
    these weights times v. fp16/bf16 inputs give fp32 weights."""
    B, Nh, H, W, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    q, k = _upcast(q), _upcast(k)
    logits = torch.einsum("bnyxd,bnuvd->bnyxuv", q, k)
    if rel_h is not None:
        logits_h, logits_w = _relative_logits(q, rel_h, rel_w)
        logits = logits + logits_h[..., :, None] + logits_w[..., None, :]
    return torch.softmax(logits.reshape(B, Nh, H * W, H * W) * scale, dim=-1)


def _naive(q, k, v, rel_h, rel_w, scale, layer="attention", on_weights=None):
    """The dense reference; `on_weights` receives the softmax weights, detached, (B, Nh, H, W, H, W)."""
    B, Nh, H, W, _ = q.shape
    with _autocast_off(q):
        weights = attention_weights(q, k, rel_h, rel_w, scale)
        if on_weights is not None:
            on_weights(weights.detach().reshape(B, Nh, H, W, H, W))
        out = weights @ _upcast(v).reshape(B, Nh, H * W, -1)
    return out.to(v.dtype)


@lru_cache(maxsize=64)
def _key_position_onehots(H: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H, W, H + W): for key pixel (y, x), one-hot of y followed by one-hot of x (cached, see _offset_rows)."""
    with torch.inference_mode(False):
        rows = torch.eye(H, dtype=dtype, device=device)[:, None, :].expand(H, W, H)
        cols = torch.eye(W, dtype=dtype, device=device)[None, :, :].expand(H, W, W)
        return torch.cat([rows, cols], dim=-1)


def fused_widths(key_width: int, value_width: int, device_type: str) -> tuple:
    """(query/key width, value width) of the fused path's scaled_dot_product_attention call.

    `key_width` is dkh + H + W with relative logits (dkh without). Both widths are rounded up to a multiple
    of SDPA_ALIGNMENT, which the memory-efficient and flash kernels need (zero columns change nothing). On
    CUDA the value keeps its own width (the memory-efficient kernel allows it); the CPU flash kernel wants
    one width for q, k and v, so there the narrower side is padded to the wider.
    """
    def align(n: int) -> int:
        return -(-n // SDPA_ALIGNMENT) * SDPA_ALIGNMENT

    if device_type == "cuda":
        return align(key_width), align(value_width)
    width = align(max(key_width, value_width))
    return width, width


def _memory_lean_sdpa(q, k, v, scale, layer):
    """scaled_dot_product_attention restricted to the backends that never build the (L, L) matrix.

    q, k (B, Nh, L, d), v (B, Nh, L, dv) -> (B, Nh, L, dv). Where none of them accepts the inputs, PyTorch
    would fall back to its math kernel (dense logits, tens of GB on large maps): that is an
    AttentionBackendError naming the layer, the sequence length and the widths instead."""
    try:
        with sdpa_kernel(MEMORY_LEAN_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    except RuntimeError as e:
        if "No available kernel" not in str(e):
            raise
        raise AttentionBackendError(
            f"{layer}: no memory-lean scaled_dot_product_attention kernel accepts {q.shape[2]} pixels with "
            f"query/key width {q.shape[-1]} and value width {v.shape[-1]} ({q.dtype}, {q.device.type}); "
            "the dense fallback would build the whole (HW, HW) logits. Use MODEL.AA.IMPL 'flex' (CUDA) or "
            "'kernel' (CPU), or attend over a smaller map") from e


def _flat_padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, Nh, H, W, d) -> (B, Nh, HW, width), zero columns added, contiguous: the memory-lean SDPA kernels
    need a last-dimension stride of 1 (FlexAttention reads rows faster with it), which split_heads' views
    lack where no column is added (F.pad by 0 keeps the strides)."""
    B, Nh, H, W, d = t.shape
    return F.pad(t, (0, width - d)).reshape(B, Nh, H * W, width).contiguous()


def _fused(q, k, v, rel_h, rel_w, scale, layer="attention"):
    """Exact low-rank form: q' = [q, q.r^H, q.r^W], k' = [k, onehot(y), onehot(x)], so q'.k' is the
    full logit and one memory-lean scaled_dot_product_attention call needs no dense (HW, HW) bias.
    Computed in fp32 whatever the input dtype (the relative logits travel inside q')."""
    B, Nh, H, W, _ = q.shape
    dtype, dv = v.dtype, v.shape[-1]
    with _autocast_off(q):
        q, k, v = _upcast(q), _upcast(k), _upcast(v)
        if rel_h is not None:
            logits_h, logits_w = _relative_logits(q, rel_h, rel_w)
            q = torch.cat([q, logits_h, logits_w], dim=-1)
            onehots = _key_position_onehots(H, W, k.dtype, k.device).expand(B, Nh, H, W, H + W)
            k = torch.cat([k, onehots], dim=-1)
        qk_width, v_width = fused_widths(q.shape[-1], dv, q.device.type)
        q, k = (_flat_padded(t, qk_width) for t in (q, k))
        out = _memory_lean_sdpa(q, k, _flat_padded(v, v_width), scale, layer)
    return out[..., :dv].to(dtype)


def flex_available(device: torch.device) -> bool:
    """True when FlexAttention can serve `impl="auto"` on this device: CUDA, a torch that has it, and no
    compile failure seen in this process."""
    return device.type == "cuda" and _flex_attention is not None and not FLEX_STATE.failed


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(_flex_attention, dynamic=None)


def _flex_width(n):
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


def _flex_row_error(out, q, k, v, bias_h, bias_w, scale, width):
    """Relative error of FLEX_CHECK_ROWS query rows of a FlexAttention output against the exact fp32 softmax.

    out, q, k (B, Nh, HW, d), v (B, Nh, HW, dv) as given to FlexAttention; bias_h (B, Nh, HW, H) and
    bias_w (B, Nh, HW, W) the scaled relative logits (or None), `width` the map's W. Costs
    FLEX_CHECK_ROWS / HW of the attention itself."""
    HW = q.shape[2]
    rows = torch.linspace(0, HW - 1, min(FLEX_CHECK_ROWS, HW), device=q.device).round().long().unique()
    with torch.no_grad(), _autocast_off(q):
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


def _compiled_flex(q, k, v, score_mod, layer):
    """The compiled FlexAttention call with `score_mod` (which scales the scores itself), (B, Nh, L, d) ->
    (B, Nh, L, dv), never silently dense: torch runs it uncompiled, building the whole (L, L) scores, once
    its compile cache for flex_attention is full (`torch._dynamo.config.recompile_limit`), which is an
    AttentionBackendError here, as is any other failure of the call, its backward's compilation included
    (running out of GPU memory is raised as it is)."""
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), _backward_compiled_with_forward():
            return _compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=1.0)
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
    """A 0-dim fp32 tensor holding `value` (cached, see _offset_rows)."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=torch.float32, device=device)


def _flex_operands(q, k, v, rel_h, rel_w, scale):
    """FlexAttention's operands for q, k (B, Nh, H, W, dkh) and v (B, Nh, H, W, dvh): q, k (B, Nh, HW, dq) and
    v (B, Nh, HW, dv) zero-padded to `_flex_width`, the score_mod (to call with FlexAttention's scale 1) that
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
        logits_h, logits_w = _relative_logits(_upcast(q), rel_h, rel_w)
        bias_h = (logits_h * scale).reshape(B, Nh, H * W, H)
        bias_w = (logits_w * scale).reshape(B, Nh, H * W, W)

        def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, query: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
            return score * scale_tensor + bias_h[b, h, query, key // W] + bias_w[b, h, query, key % W]

    q, k = (_flat_padded(t, _flex_width(dkh)) for t in (q, k))
    return q, k, _flat_padded(v, _flex_width(dvh)), score_mod, bias_h, bias_w


def _flex(q, k, v, rel_h, rel_w, scale, layer="attention", compiled=None):
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
    with _autocast_off(q):
        if not compiled:
            q, k, v = _upcast(q), _upcast(k), _upcast(v)
        q, k, v, score_mod, bias_h, bias_w = _flex_operands(q, k, v, rel_h, rel_w, scale)
        if compiled:
            graphs = _compiled_graphs()
            out = _compiled_flex(q, k, v, score_mod, layer)
            if _compiled_graphs() != graphs:
                FLEX_STATE.signatures.update(dict.fromkeys(FLEX_STATE.signatures, False))
            signature = (q.device.type, q.dtype, B, Nh, H, W, q.shape[-1], v.shape[-1], torch.is_grad_enabled(),
                         *(t is not None and t.requires_grad for t in (q, k, v, bias_h)), rel_h is not None)
            if not FLEX_STATE.signatures.get(signature, False):
                error = _flex_row_error(out, q, k, v, bias_h, bias_w, scale, W)
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


def _kernel(q, k, v, rel_h, rel_w, scale, layer="attention"):
    """The kernel from (B, Nh, H, W, d) q, k, v: packed into the qkv layout (one copy)."""
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    if not math.isclose(scale, 1.0 / math.sqrt(dkh)):
        raise ValueError("the kernel path uses the scale 1/sqrt(dkh)")
    qkv = torch.cat([t.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W) for t in (q.float(), k.float(), v.float())], 1)
    out = kernel_attention(qkv, Nh, Nh * dkh, Nh * dvh, rel_h, rel_w, layer)
    return out.reshape(B, Nh, dvh, H, W).permute(0, 1, 3, 4, 2).to(v.dtype)


def split_heads(qkv: torch.Tensor, num_heads: int, dk: int, dv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, 2 dk + dv, H, W) -> q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) (views)."""
    B, _, H, W = qkv.shape
    return tuple(t.reshape(B, num_heads, -1, H, W).permute(0, 1, 3, 4, 2) for t in qkv.split([dk, dk, dv], dim=1))


def choose_impl(device: torch.device, height: int, width: int, key_width: int, value_width: int,
                dtype: torch.dtype = torch.float32) -> str:
    """The path `impl="auto"` takes for one layer's (height x width) map with head widths dkh, dvh:

    1. "kernel": CPU tensors, the compiled kernel built, both head widths <= KERNEL_MAX_HEAD_WIDTH and not
       float64 (the fastest CPU path at every map size measured, 4x4 to 100x167);
    2. "naive": maps of at most NAIVE_MAX_PIXELS pixels (dense logits are cheapest there);
    3. "flex": CUDA with FlexAttention working (compiled; no (HW, HW) tensor, no padded width);
    4. "fused": otherwise (memory-lean SDPA backends only; exact, fp32).
    """
    if (device.type == "cpu" and kernel.kernel_available() and max(key_width, value_width) <= KERNEL_MAX_HEAD_WIDTH
            and dtype != torch.float64):
        return "kernel"
    if height * width <= NAIVE_MAX_PIXELS:
        return "naive"
    if flex_available(device):
        return "flex"
    return "fused"


def relative_attention_qkv(qkv: torch.Tensor, num_heads: int, dk: int, dv: int, rel_h: Optional[torch.Tensor] = None,
                           rel_w: Optional[torch.Tensor] = None, impl: str = "auto",
                           layer: str = "attention",
                           on_weights: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """relative_attention_2d on the output of a qkv 1x1 convolution, (B, 2 dk + dv, H, W) -> (B, dv, H, W).

    Channels of qkv: the dk queries, the dk keys, then the dv values, head n holding channels
    [n * dkh, (n + 1) * dkh) of each (dkh = dk / num_heads); output channel n * dvh + c is value
    dimension c of head n. The kernel path reads this layout as it is, with no permuted copies, and
    computes the relative logits from the tables itself. `layer` names the caller in errors.
    `on_weights` (the naive path only) receives the softmax weights that make the output, detached,
    (B, Nh, H, W, H, W)."""
    B, C, H, W = qkv.shape
    if C != 2 * dk + dv or dk % num_heads or dv % num_heads:
        raise ValueError(f"qkv with {C} channels does not match dk={dk}, dv={dv}, num_heads={num_heads}")
    check_impl(impl)
    if on_weights is not None and impl != "naive":
        raise ValueError(f"on_weights needs impl='naive' (the one path with dense weights), got {impl!r}")
    auto = impl == "auto"
    if auto:
        impl = choose_impl(qkv.device, H, W, dk // num_heads, dv // num_heads, qkv.dtype)
    if impl == "kernel":
        return kernel_attention(qkv, num_heads, dk, dv, rel_h, rel_w, layer)
    q, k, v = split_heads(qkv, num_heads, dk, dv)
    out = _attend(impl, q, k, v, rel_h, rel_w, layer, auto, on_weights)
    return out.permute(0, 1, 4, 2, 3).reshape(B, dv, H, W)


# The attention paths, the one list of them: the config's MODEL.AA.IMPL choices are these and "auto".
PATHS = {"naive": _naive, "fused": _fused, "kernel": _kernel, "flex": _flex}
IMPLS = ("auto", *PATHS)


def check_impl(impl: str) -> None:
    """ValueError unless `impl` is "auto" or a path of PATHS."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _attend(impl, q, k, v, rel_h, rel_w, layer, auto=False, on_weights=None):
    """(B, Nh, H, W, dvh) through path `impl`. Chosen by "auto", a FlexAttention failure (a compile error, a
    refused output) is logged once and the fused path used from then on; running out of GPU memory is
    raised as it is (the fused path needs more). Inside a torch.jit trace (fvcore's FLOP count, a
    TorchScript export) "flex" is the fused path: the same attention, in operators a trace can record.
    `on_weights` (impl "naive") receives the naive path's softmax weights."""
    if impl == "flex" and torch.jit.is_tracing():
        impl = "fused"
    scale = 1.0 / math.sqrt(q.shape[-1])
    attend = PATHS[impl] if on_weights is None else partial(_naive, on_weights=on_weights)
    if impl == "flex" and auto:
        try:
            out = attend(q, k, v, rel_h, rel_w, scale, layer)
        except Exception as e:  # a torch.compile / Triton failure or a refused output: the exact fused path
            if isinstance(e, torch.cuda.OutOfMemoryError):  # the fused path needs more memory, not less
                raise
            FLEX_STATE.failed = True
            logger.warning("%s: FlexAttention failed (%s: %s); using the fused path from now on",
                           layer, type(e).__name__, e)
            out = _fused(q, k, v, rel_h, rel_w, scale, layer)
    else:
        out = attend(q, k, v, rel_h, rel_w, scale, layer)
    return out.reshape(v.shape)


def relative_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor] = None,
                          rel_w: Optional[torch.Tensor] = None, impl: str = "auto",
                          layer: str = "attention") -> torch.Tensor:
    """Self-attention with 2D relative position logits.

    Args:
        q, k: (B, Nh, H, W, dkh) queries and keys, unscaled.
        v: (B, Nh, H, W, dvh) values.
        rel_h: (2L_h-1, dkh) embeddings of y offsets, row o + L_h - 1 for offset o = y_key - y_query;
            usually L_h = H. Offsets beyond +-(L_h-1) use the last row on their side. None, with
            rel_w None, gives content-only attention.
        rel_w: (2L_w-1, dkh), likewise for x offsets.
        impl: "naive" (dense logits, the reference), "fused" (exact low-rank form through the memory-lean
            scaled_dot_product_attention backends, never builds (HW, HW) logits), "kernel" (the compiled
            CPU kernel, never stores (HW, HW) logits at all; needs aa_detection._C), "flex" (FlexAttention
            with the relative logits in its score_mod; compiled on CUDA) or "auto" (see `choose_impl`).
        layer: the caller's name, used in error messages.

    Logits, the softmax and its statistics are fp32 on every path, also for fp16/bf16 inputs (autocast;
    compiled FlexAttention accumulates the q.k products of fp16/bf16 inputs in fp32); the output has v's dtype.

    Returns:
        (B, Nh, H, W, dvh)
    """
    check_impl(impl)
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (or both None for content-only attention)")
    if q.dim() != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(
            f"expected q, k (B, Nh, H, W, dkh) and v (B, Nh, H, W, dvh), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if rel_h is not None and (rel_h.shape[-1] != q.shape[-1] or rel_w.shape[-1] != q.shape[-1]):
        raise ValueError(
            f"rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} must have width dkh={q.shape[-1]}"
        )
    _, _, H, W, dk = q.shape
    auto = impl == "auto"
    if auto:
        impl = choose_impl(q.device, H, W, dk, v.shape[-1], q.dtype)
    return _attend(impl, q, k, v, rel_h, rel_w, layer, auto)
