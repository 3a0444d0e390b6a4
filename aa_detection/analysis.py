"""Parameter and FLOP counts shared by the tools (fvcore conventions: one multiply-add is one flop).

fvcore already counts convolutions, linear layers, matmul/bmm and einsum (the naive attention path and the
q . r relative logits). `flop_count` adds `aten::scaled_dot_product_attention` (the fused attention path),
counted as its two matmuls q.k and p.v by their REAL widths: the fused path concatenates one-hot position
columns to q/k (the relative logits, already counted by their einsum) and zero-pads to a common width;
the handle walks back through those reshapes, pads and concatenations to the true dkh and dvh. The
compiled CPU kernel (an autograd Function, `prim::PythonOp._KernelAttention` in the trace) is counted
likewise: q.k and p.v at the real widths plus its relative logits.
"""
from collections import Counter

from fvcore.nn.jit_handles import get_shape
import torch

__all__ = ["count_parameters", "flop_count", "kernel_attention_flop_jit", "sdpa_flop_jit", "KERNEL_OP_NAME"]

_PASS_THROUGH = {"aten::reshape", "aten::view", "aten::contiguous", "aten::constant_pad_nd", "aten::pad",
                 "aten::expand", "aten::to"}


def count_parameters(model):
    """{"total": all parameters, "trainable": those with requires_grad} of a module."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def _real_width(value):
    """Last-dim width of the tensor a fused-attention operand was built from (before pads / one-hots)."""
    shape = get_shape(value)
    width = shape[-1] if shape else None
    node = value.node()
    for _ in range(16):
        kind = node.kind()
        if kind in _PASS_THROUGH:
            value = next(node.inputs())
            node = value.node()
            continue
        if kind == "aten::cat":
            parts = list(next(node.inputs()).node().inputs())  # the ListConstruct of cat's tensors
            first = get_shape(parts[0]) if parts else None
            return first[-1] if first else width
        shape = get_shape(value)
        return shape[-1] if shape else width
    return width


def sdpa_flop_jit(inputs, outputs):
    """FLOPs of aten::scaled_dot_product_attention: B*Nh*L*S*(dk + dv), dk and dv the real widths."""
    q_shape, k_shape = get_shape(inputs[0]), get_shape(inputs[1])
    batch = 1
    for d in q_shape[:-2]:
        batch *= d
    L, S = q_shape[-2], k_shape[-2]
    return batch * L * S * (_real_width(inputs[0]) + _real_width(inputs[2]))


def kernel_attention_flop_jit(inputs, outputs):
    """FLOPs of the compiled kernel's attention (qkv (B, 2 dk + dv, H, W) -> (B, dv, H, W)): its matmuls
    q.k and p.v, B*HW*HW*(dk + dv), and the relative logits q.r^H, q.r^W, B*HW*(H + W)*dk."""
    B, C, H, W = get_shape(inputs[0])
    dv = get_shape(outputs[0])[1]
    dk = (C - dv) // 2
    HW = H * W
    return B * HW * HW * (dk + dv) + B * HW * (H + W) * dk


KERNEL_OP = "prim::PythonOp._KernelAttention"
KERNEL_OP_NAME = KERNEL_OP.split("::", 1)[1]  # its key in flop_count's per-operator counts


def flop_count(model, inputs):
    """fvcore FlopCountAnalysis of a detectron2 model (or any module) with attention matmuls counted.

    `inputs` is the tuple of positional arguments of model.forward (for a detectron2 meta-architecture,
    `([{"image": tensor}],)`). Returns (total flops, Counter {operator: flops}); run the model in eval mode.
    """
    try:
        from detectron2.utils.analysis import FlopCountAnalysis
    except ImportError:  # plain torch modules without detectron2
        from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.set_op_handle(KERNEL_OP, kernel_attention_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        by_operator = Counter(analysis.by_operator())
    return analysis.total(), by_operator
