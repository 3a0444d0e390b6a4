"""What every attention path shares: 2D relative position logits (Bello et al., 2019), the dense
softmax weights, the fp32 rule, the flat padded layout and the error a path raises.

For query pixel i = (y_i, x_i) and key pixel j = (y_j, x_j) of an H x W map:

    logit_ij = (q_i . k_j + q_i . rel_h[y_j - y_i + H - 1] + q_i . rel_w[x_j - x_i + W - 1]) / sqrt(dkh)
    out_i    = sum_j softmax_j(logit_ij) v_j

The offset is key minus query, the 1/sqrt(dkh) scale covers the relative terms too, and the tables
rel_h (2H-1, dkh) and rel_w (2W-1, dkh) are shared by all heads.
"""
import contextlib
from functools import lru_cache
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["AttentionBackendError", "attention_weights", "autocast_off", "flat_padded", "relative_logits",
           "relative_table", "resize_relative_table", "split_heads", "upcast"]


class AttentionBackendError(RuntimeError):
    """An attention path that cannot run these inputs without building the dense (HW, HW) logits."""



def upcast(t):
    """fp16/bf16 -> fp32 (logits and softmax statistics stay in fp32 under mixed precision); others as they are."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def autocast_off(t):
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


def relative_logits(q, rel_h, rel_w):
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
    q, k = upcast(q), upcast(k)
    logits = torch.einsum("bnyxd,bnuvd->bnyxuv", q, k)
    if rel_h is not None:
        logits_h, logits_w = relative_logits(q, rel_h, rel_w)
        logits = logits + logits_h[..., :, None] + logits_w[..., None, :]
    return torch.softmax(logits.reshape(B, Nh, H * W, H * W) * scale, dim=-1)


def flat_padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, Nh, H, W, d) -> (B, Nh, HW, width), zero columns added, contiguous: the memory-lean SDPA kernels
    need a last-dimension stride of 1 (FlexAttention reads rows faster with it), which split_heads' views
    lack where no column is added (F.pad by 0 keeps the strides)."""
    B, Nh, H, W, d = t.shape
    return F.pad(t, (0, width - d)).reshape(B, Nh, H * W, width).contiguous()


def split_heads(qkv: torch.Tensor, num_heads: int, dk: int, dv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, 2 dk + dv, H, W) -> q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) (views)."""
    B, _, H, W = qkv.shape
    return tuple(t.reshape(B, num_heads, -1, H, W).permute(0, 1, 3, 4, 2) for t in qkv.split([dk, dk, dv], dim=1))
