"""Multi-head self-attention over a 2D map with relative position logits (Bello et al., 2019).

For query pixel i = (y_i, x_i) and key pixel j = (y_j, x_j) of an H x W map:

    logit_ij = (q_i . k_j + q_i . rel_h[y_j - y_i + H - 1] + q_i . rel_w[x_j - x_i + W - 1]) / sqrt(dkh)
    out_i    = sum_j softmax_j(logit_ij) v_j

The offset is key minus query, the 1/sqrt(dkh) scale covers the relative terms too, and the tables
rel_h (2H-1, dkh) and rel_w (2W-1, dkh) are shared by all heads.
"""
from functools import lru_cache
import math

import torch
import torch.nn.functional as F

__all__ = ["attention_weights", "kernel_available", "relative_attention_2d", "relative_table", "IMPLS",
           "NAIVE_MAX_PIXELS"]

IMPLS = ("auto", "naive", "fused", "kernel")

try:  # the optional C++/OpenMP CPU kernel, built by setup.py
    from aa_detection import _C
except ImportError:  # pure-Python install: the PyTorch paths are used
    _C = None


def kernel_available() -> bool:
    """True when the compiled CPU kernel `aa_detection._C` is importable."""
    return _C is not None


# "auto" without the compiled kernel (GPU, or a pure-Python install) keeps the dense path up to this
# many pixels per map and uses the fused path above. On the 2-core CPU, `tools/benchmark_attention.py
# --sweep` (res5 head widths, batch 2, 8 heads) had the dense path faster up to 8x8 maps, mixed at 12x16
# (fused faster forward, slower forward+backward) and the fused path faster from 16x24 (384 pixels) up.
NAIVE_MAX_PIXELS = 256


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


def _relative_logits(q, rel_h, rel_w):
    """q (B, Nh, H, W, d) -> unscaled relative logits along y (B, Nh, H, W, H) and x (B, Nh, H, W, W)."""
    H, W = q.shape[2:4]
    logits_h = torch.einsum("bnyxd,ykd->bnyxk", q, relative_table(rel_h, H).to(q.dtype))
    logits_w = torch.einsum("bnyxd,xkd->bnyxk", q, relative_table(rel_w, W).to(q.dtype))
    return logits_h, logits_w


def attention_weights(q, k, rel_h=None, rel_w=None, scale=None):
    """The softmax weights, dense: q, k (B, Nh, H, W, dkh) -> (B, Nh, HW, HW), row i for query pixel
    i = y * W + x, summing to one over the keys; scale defaults to 1/sqrt(dkh). The naive path is
    these weights times v."""
    B, Nh, H, W, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    logits = torch.einsum("bnyxd,bnuvd->bnyxuv", q, k)
    if rel_h is not None:
        logits_h, logits_w = _relative_logits(q, rel_h, rel_w)
        logits = logits + logits_h[..., :, None] + logits_w[..., None, :]
    return torch.softmax(logits.reshape(B, Nh, H * W, H * W) * scale, dim=-1)


def _naive(q, k, v, rel_h, rel_w, scale):
    B, Nh, H, W, _ = q.shape
    return attention_weights(q, k, rel_h, rel_w, scale) @ v.reshape(B, Nh, H * W, -1)


@lru_cache(maxsize=64)
def _key_position_onehots(H: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H, W, H + W): for key pixel (y, x), one-hot of y followed by one-hot of x (cached, see _offset_rows)."""
    with torch.inference_mode(False):
        rows = torch.eye(H, dtype=dtype, device=device)[:, None, :].expand(H, W, H)
        cols = torch.eye(W, dtype=dtype, device=device)[None, :, :].expand(H, W, W)
        return torch.cat([rows, cols], dim=-1)


def _fused(q, k, v, rel_h, rel_w, scale):
    """Exact low-rank form: q' = [q, q.r^H, q.r^W], k' = [k, onehot(y), onehot(x)], so q'.k' is the
    full logit and one scaled_dot_product_attention call needs no dense (HW, HW) bias."""
    B, Nh, H, W, _ = q.shape
    dv = v.shape[-1]
    if rel_h is not None:
        logits_h, logits_w = _relative_logits(q, rel_h, rel_w)
        q = torch.cat([q, logits_h, logits_w], dim=-1)
        onehots = _key_position_onehots(H, W, k.dtype, k.device).expand(B, Nh, H, W, H + W)
        k = torch.cat([k, onehots], dim=-1)
    # CPU flash attention wants one width for q, k and v: pad the narrower side with zeros.
    width = max(q.shape[-1], dv)
    q, k = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k))
    v = F.pad(v, (0, width - dv))
    out = F.scaled_dot_product_attention(
        q.reshape(B, Nh, H * W, width),
        k.reshape(B, Nh, H * W, width),
        v.reshape(B, Nh, H * W, width),
        scale=scale,
    )
    return out[..., :dv]


class _KernelAttention(torch.autograd.Function):
    """The compiled CPU kernel: per query, key rows are visited with an online softmax, so the
    (HW, HW) logits are never stored; backward recomputes them from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, logits_h, logits_w, scale):
        B, Nh, H, W, dk = q.shape
        tensors = (
            q.reshape(B, Nh, H * W, dk).contiguous(),
            k.reshape(B, Nh, H * W, dk).transpose(-1, -2).contiguous(),
            v.reshape(B, Nh, H * W, -1).transpose(-1, -2).contiguous(),
            logits_h.reshape(B, Nh, H * W, H).contiguous(),
            logits_w.reshape(B, Nh, H * W, W).contiguous(),
        )
        out, lse = _C.attention_forward(*tensors, H, W, scale)
        ctx.save_for_backward(*tensors, out, lse)
        ctx.shape, ctx.scale = (B, Nh, H, W, dk, v.shape[-1]), scale
        return out.reshape(B, Nh, H, W, -1)

    @staticmethod
    def backward(ctx, grad_out):
        B, Nh, H, W, dk, dv = ctx.shape
        q, kT, vT, rh, rw, out, lse = ctx.saved_tensors
        grad_out = grad_out.reshape(B, Nh, H * W, dv).contiguous()
        dq, dkT, dvT, drh, drw = _C.attention_backward(grad_out, q, kT, vT, rh, rw, out, lse, H, W, ctx.scale)
        grads = (
            dq.reshape(B, Nh, H, W, dk),
            dkT.transpose(-1, -2).reshape(B, Nh, H, W, dk),
            dvT.transpose(-1, -2).reshape(B, Nh, H, W, dv),
            drh.reshape(B, Nh, H, W, H),
            drw.reshape(B, Nh, H, W, W),
        )
        return (*grads, None)


def _kernel(q, k, v, rel_h, rel_w, scale):
    """The compiled CPU kernel in fp32; the cheap per-query relative logits q.r^H (B, Nh, H, W, H) and
    q.r^W (B, Nh, H, W, W) come from PyTorch, so their gradient reaches the tables through autograd."""
    if q.device.type != "cpu" or _C is None:
        raise RuntimeError("impl='kernel' needs the compiled CPU kernel aa_detection._C and CPU tensors")
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    B, Nh, H, W, _ = q.shape
    if rel_h is not None:
        logits_h, logits_w = _relative_logits(q, rel_h.float(), rel_w.float())
    else:
        logits_h, logits_w = q.new_zeros(B, Nh, H, W, H), q.new_zeros(B, Nh, H, W, W)
    return _KernelAttention.apply(q, k, v, logits_h, logits_w, scale).to(dtype)


def _choose_impl(q):
    """The "auto" rule: the compiled kernel for CPU tensors when it is built (the fastest path at every
    map size measured, 8x8 to 100x167); otherwise dense logits up to NAIVE_MAX_PIXELS pixels, fused above."""
    if q.device.type == "cpu" and _C is not None:
        return "kernel"
    H, W = q.shape[2:4]
    return "naive" if H * W <= NAIVE_MAX_PIXELS else "fused"


_IMPLEMENTATIONS = {"naive": _naive, "fused": _fused, "kernel": _kernel}


def relative_attention_2d(q, k, v, rel_h=None, rel_w=None, impl="auto"):
    """Self-attention with 2D relative position logits.

    Args:
        q, k: (B, Nh, H, W, dkh) queries and keys, unscaled.
        v: (B, Nh, H, W, dvh) values.
        rel_h: (2L_h-1, dkh) embeddings of y offsets, row o + L_h - 1 for offset o = y_key - y_query;
            usually L_h = H. Offsets beyond +-(L_h-1) use the last row on their side. None, with
            rel_w None, gives content-only attention.
        rel_w: (2L_w-1, dkh), likewise for x offsets.
        impl: "naive" (dense logits, the reference), "fused" (exact low-rank form through
            scaled_dot_product_attention, never builds (HW, HW) relative logits), "kernel" (the compiled
            CPU kernel, never stores (HW, HW) logits at all; needs aa_detection._C) or "auto" (the kernel
            for CPU tensors when it is built; otherwise naive up to NAIVE_MAX_PIXELS pixels, fused above).

    Returns:
        (B, Nh, H, W, dvh)
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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
    B, Nh, H, W, dk = q.shape
    if impl == "auto":
        impl = _choose_impl(q)
    out = _IMPLEMENTATIONS[impl](q, k, v, rel_h, rel_w, 1.0 / math.sqrt(dk))
    return out.reshape(B, Nh, H, W, v.shape[-1])
