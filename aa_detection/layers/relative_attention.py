"""Multi-head self-attention over a 2D map with relative position logits: the entry points and the
choice of path.

The formulation is in `relative_logits`; each path is a module with one `attend(q, k, v, rel_h, rel_w,
scale, layer)`: `naive` (dense logits, the reference), `fused` (memory-lean SDPA), `flex`
(FlexAttention, CUDA) and `kernel` (the compiled CPU kernel). `PATHS` is the one list of them.
"""
from functools import partial
import logging
import math
from typing import Callable, Optional

import torch

from . import flex, fused, kernel, naive
from .relative_logits import split_heads

__all__ = ["IMPLS", "PATHS", "check_impl", "choose_impl", "relative_attention_2d", "relative_attention_qkv"]

logger = logging.getLogger(__name__)

# The attention paths, the one list of them: the config's MODEL.AA.IMPL choices are these and "auto".
PATHS = {"naive": naive.attend, "fused": fused.attend, "kernel": kernel.attend, "flex": flex.attend}
IMPLS = ("auto", *PATHS)


def check_impl(impl: str) -> None:
    """ValueError unless `impl` is "auto" or a path of PATHS."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def choose_impl(device: torch.device, height: int, width: int, key_width: int, value_width: int,
                dtype: torch.dtype = torch.float32) -> str:
    """The path `impl="auto"` takes for one layer's (height x width) map with head widths dkh, dvh:

    1. "kernel": CPU tensors, the compiled kernel built, both head widths <= KERNEL_MAX_HEAD_WIDTH and not
       float64 (the fastest CPU path at every map size measured, 4x4 to 100x167);
    2. "naive": maps of at most NAIVE_MAX_PIXELS pixels (dense logits are cheapest there);
    3. "flex": CUDA with FlexAttention working (compiled; no (HW, HW) tensor, no padded width);
    4. "fused": otherwise (memory-lean SDPA backends only; exact, fp32).
    """
    kernel_fits = max(key_width, value_width) <= kernel.KERNEL_MAX_HEAD_WIDTH and dtype != torch.float64
    if device.type == "cpu" and kernel.kernel_available() and kernel_fits:
        return "kernel"
    if height * width <= naive.NAIVE_MAX_PIXELS:
        return "naive"
    if flex.flex_available(device):
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
        return kernel.kernel_attention(qkv, num_heads, dk, dv, rel_h, rel_w, layer)
    q, k, v = split_heads(qkv, num_heads, dk, dv)
    out = _attend(impl, q, k, v, rel_h, rel_w, layer, auto, on_weights)
    return out.permute(0, 1, 4, 2, 3).reshape(B, dv, H, W)


def _attend(impl, q, k, v, rel_h, rel_w, layer, auto=False, on_weights=None):
    """(B, Nh, H, W, dvh) through path `impl`. Chosen by "auto", a FlexAttention failure (a compile error, a
    refused output) is logged once and the fused path used from then on; running out of GPU memory is
    raised as it is (the fused path needs more). Inside a torch.jit trace (fvcore's FLOP count, a
    TorchScript export) "flex" is the fused path: the same attention, in operators a trace can record.
    `on_weights` (impl "naive") receives the naive path's softmax weights."""
    if impl == "flex" and torch.jit.is_tracing():
        impl = "fused"
    scale = 1.0 / math.sqrt(q.shape[-1])
    attend = PATHS[impl] if on_weights is None else partial(naive.attend, on_weights=on_weights)
    if impl == "flex" and auto:
        try:
            out = attend(q, k, v, rel_h, rel_w, scale, layer)
        except Exception as e:  # a torch.compile / Triton failure or a refused output: the exact fused path
            if isinstance(e, torch.cuda.OutOfMemoryError):  # the fused path needs more memory, not less
                raise
            flex.FLEX_STATE.failed = True
            logger.warning("%s: FlexAttention failed (%s: %s); using the fused path from now on",
                           layer, type(e).__name__, e)
            out = fused.attend(q, k, v, rel_h, rel_w, scale, layer)
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
