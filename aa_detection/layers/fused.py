"""The fused attention path: the relative logits folded into the queries and keys of one memory-lean
scaled_dot_product_attention call, exact and never building the dense (HW, HW) logits."""
from functools import lru_cache

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from .relative_logits import AttentionBackendError, autocast_off, flat_padded, relative_logits, upcast

__all__ = ["MEMORY_LEAN_BACKENDS", "SDPA_ALIGNMENT", "attend", "fused_widths", "memory_lean_sdpa"]

# Widths of the fused path's SDPA call are multiples of this: the memory-efficient kernel needs 8 for
# fp16/bf16 and 4 for fp32, flash attention 8.
SDPA_ALIGNMENT = 8
# The scaled_dot_product_attention backends that never build the dense (L, L) matrix.
MEMORY_LEAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@lru_cache(maxsize=64)
def _key_position_onehots(H: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H, W, H + W): for key pixel (y, x), one-hot of y followed by one-hot of x (cached, so
    created outside inference mode, as relative_logits._offset_rows)."""
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


def memory_lean_sdpa(q, k, v, scale, layer):
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


def attend(q, k, v, rel_h, rel_w, scale, layer="attention"):
    """q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) -> (B, Nh, HW, dvh) in the exact low-rank form
    q' = [q, q.r^H, q.r^W], k' = [k, onehot(y), onehot(x)]: q'.k' is the full logit, and one memory-lean
    scaled_dot_product_attention call needs no dense (HW, HW) bias. Computed in fp32 whatever the input
    dtype (the relative logits travel inside q')."""
    B, Nh, H, W, _ = q.shape
    dtype, dv = v.dtype, v.shape[-1]
    with autocast_off(q):
        q, k, v = upcast(q), upcast(k), upcast(v)
        if rel_h is not None:
            logits_h, logits_w = relative_logits(q, rel_h, rel_w)
            q = torch.cat([q, logits_h, logits_w], dim=-1)
            onehots = _key_position_onehots(H, W, k.dtype, k.device).expand(B, Nh, H, W, H + W)
            k = torch.cat([k, onehots], dim=-1)
        qk_width, v_width = fused_widths(q.shape[-1], dv, q.device.type)
        q, k = (flat_padded(t, qk_width) for t in (q, k))
        out = memory_lean_sdpa(q, k, flat_padded(v, v_width), scale, layer)
    return out[..., :dv].to(dtype)
