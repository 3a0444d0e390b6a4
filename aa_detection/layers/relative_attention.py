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

__all__ = ["attention_weights", "kernel_available", "relative_attention_2d", "relative_attention_qkv",
           "relative_table", "split_heads", "IMPLS", "NAIVE_MAX_PIXELS"]

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
    """The compiled CPU kernel on the qkv convolution's output (B, 2 dk + dv, H, W), fp32: per query, the
    H + W relative logits are computed from the tables, then key rows are visited with an online
    softmax, so the (HW, HW) logits are never stored; backward recomputes them from the saved
    log-sum-exp and returns the gradients of qkv and of both tables directly."""

    @staticmethod
    def forward(ctx, qkv, rel_h, rel_w, num_heads, dk, dv, scale):
        out, lse = _C.attention_forward(qkv, rel_h, rel_w, num_heads, dk, dv, scale)
        ctx.save_for_backward(qkv, rel_h, rel_w, out, lse)
        ctx.args = (num_heads, dk, dv, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, rel_h, rel_w, out, lse = ctx.saved_tensors
        dqkv, drel_h, drel_w = _C.attention_backward(grad_out.contiguous(), qkv, rel_h, rel_w, out, lse, *ctx.args)
        if rel_h.numel() == 0:
            drel_h = drel_w = None
        return dqkv, drel_h, drel_w, None, None, None, None


_EMPTY = {}


def _empty(device):
    if device not in _EMPTY:
        with torch.inference_mode(False):
            _EMPTY[device] = torch.empty(0, device=device)
    return _EMPTY[device]


def _kernel_qkv(qkv, num_heads, dk, dv, rel_h, rel_w):
    """qkv (B, 2 dk + dv, H, W) -> (B, dv, H, W) through the compiled kernel, in fp32 (inputs of other
    dtypes, e.g. bfloat16 under autocast, are converted and the output converted back)."""
    if qkv.device.type != "cpu" or _C is None:
        raise RuntimeError("impl='kernel' needs the compiled CPU kernel aa_detection._C and CPU tensors")
    dtype = qkv.dtype
    scale = 1.0 / math.sqrt(dk // num_heads)
    if rel_h is None:
        rel_h = rel_w = _empty(qkv.device)
    qkv, rel_h, rel_w = (t.float().contiguous() for t in (qkv, rel_h, rel_w))
    return _KernelAttention.apply(qkv, rel_h, rel_w, num_heads, dk, dv, scale).to(dtype)


def _kernel(q, k, v, rel_h, rel_w, scale):
    """The kernel from (B, Nh, H, W, d) q, k, v: packed into the qkv layout (one copy)."""
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    if not math.isclose(scale, 1.0 / math.sqrt(dkh)):
        raise ValueError("the kernel path uses the scale 1/sqrt(dkh)")
    qkv = torch.cat([t.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W) for t in (q.float(), k.float(), v.float())], 1)
    out = _kernel_qkv(qkv, Nh, Nh * dkh, Nh * dvh, rel_h, rel_w)
    return out.reshape(B, Nh, dvh, H, W).permute(0, 1, 3, 4, 2).to(q.dtype)


def split_heads(qkv, num_heads, dk, dv):
    """qkv (B, 2 dk + dv, H, W) -> q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) (views)."""
    B, _, H, W = qkv.shape
    return tuple(t.reshape(B, num_heads, -1, H, W).permute(0, 1, 3, 4, 2) for t in qkv.split([dk, dk, dv], dim=1))


def relative_attention_qkv(qkv, num_heads, dk, dv, rel_h=None, rel_w=None, impl="auto"):
    """relative_attention_2d on the output of a qkv 1x1 convolution, (B, 2 dk + dv, H, W) -> (B, dv, H, W).

    Channels of qkv: the dk queries, the dk keys, then the dv values, head n holding channels
    [n * dkh, (n + 1) * dkh) of each (dkh = dk / num_heads); output channel n * dvh + c is value
    dimension c of head n. The kernel path reads this layout as it is, with no permuted copies, and
    computes the relative logits from the tables itself."""
    B, C, H, W = qkv.shape
    if C != 2 * dk + dv or dk % num_heads or dv % num_heads:
        raise ValueError(f"qkv with {C} channels does not match dk={dk}, dv={dv}, num_heads={num_heads}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = _choose_impl(qkv.new_empty(B, num_heads, H, W, 0))
    if impl == "kernel":
        return _kernel_qkv(qkv, num_heads, dk, dv, rel_h, rel_w)
    q, k, v = split_heads(qkv, num_heads, dk, dv)
    out = relative_attention_2d(q, k, v, rel_h, rel_w, impl=impl)
    return out.permute(0, 1, 4, 2, 3).reshape(B, dv, H, W)


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
