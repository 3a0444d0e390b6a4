"""The naive attention path: dense (HW, HW) logits and softmax, the reference every other path matches."""
from .relative_logits import attention_weights, autocast_off, upcast

__all__ = ["NAIVE_MAX_PIXELS", "attend"]

# "auto" keeps the dense path up to this many pixels per map where the compiled kernel does not serve
# the layer. On the 2-core CPU, `tools/benchmark_attention.py --sweep` (res5 head widths, batch 2, 8 heads)
# had the dense path faster up to 8x8 maps, mixed at 12x16 (fused faster forward, slower forward+backward)
# and the fused path faster from 16x24 (384 pixels) up.
NAIVE_MAX_PIXELS = 256


def attend(q, k, v, rel_h, rel_w, scale, layer="attention", on_weights=None):
    """q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) -> (B, Nh, HW, dvh); `on_weights` receives the softmax
    weights, detached, (B, Nh, H, W, H, W)."""
    B, Nh, H, W, _ = q.shape
    with autocast_off(q):
        weights = attention_weights(q, k, rel_h, rel_w, scale)
        if on_weights is not None:
            on_weights(weights.detach().reshape(B, Nh, H, W, H, W))
        out = weights @ upcast(v).reshape(B, Nh, H * W, -1)
    return out.to(v.dtype)
