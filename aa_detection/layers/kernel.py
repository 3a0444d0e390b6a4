"""The compiled CPU attention kernel `aa_detection._C` as the operators `torch.ops.aa_detection.*`.

The C++ library registers `attention_forward` and `attention_backward` (CPU); here they get their fake
(meta) implementations and autograd, so TorchScript tracing, `torch.export` and `torch.compile` see one
operator where the layer calls the kernel. A saved TorchScript model or exported program needs
`import aa_detection` (or `torch.ops.load_library` of the `_C` file) before it is loaded.
"""
import contextlib
import math
import os
import warnings
from typing import Iterator, List, Optional

import torch

__all__ = ["attend", "kernel_attention", "kernel_available", "kernel_isas", "using_kernel_isa", "KERNEL_MAX_HEAD_WIDTH"]

try:  # the C++/OpenMP CPU kernel, built by setup.py
    from aa_detection import _C
except ImportError as e:  # an install that could not build it: the PyTorch paths are used
    _C = None
    if os.environ.get("AA_DETECTION_NO_EXTENSION", "0") != "1":
        warnings.warn(
            f"aa_detection: the compiled CPU attention kernel aa_detection._C is not built ({e}); attention on "
            "the CPU uses the slower PyTorch paths (fused, naive). Build it with `pip install "
            "--no-build-isolation -e .` in an environment with torch (or `bash tools/install.sh`); "
            "AA_DETECTION_NO_EXTENSION=1 silences this", RuntimeWarning, stacklevel=2)

# The widest head (dkh or dvh) the kernel takes (kMaxWidth in csrc/attention_kernel.h).
KERNEL_MAX_HEAD_WIDTH = 64 if _C is None else _C.max_head_width


def kernel_available() -> bool:
    """True when the compiled CPU kernel `aa_detection._C` is importable."""
    return _C is not None


def kernel_isas() -> List[str]:
    """The instruction sets of the kernel this CPU runs ("avx512", "avx2", "default"), the one in use by
    default first; [] without the kernel."""
    return [] if _C is None else _C.kernel_isas()


@contextlib.contextmanager
def using_kernel_isa(name: str) -> Iterator[None]:
    """The kernel compiled for instruction set `name` (one of `kernel_isas()`) serves the calls inside,
    for tests and benchmarks; a name this CPU does not run is a ValueError listing those it does."""
    if _C is None:
        raise RuntimeError("the compiled CPU kernel aa_detection._C is not built")
    before = _C.kernel_isa()
    _C.set_kernel_isa(name)
    try:
        yield
    finally:
        _C.set_kernel_isa(before)


if _C is not None:

    @torch.library.register_fake("aa_detection::attention_forward")
    def _attention_forward_fake(qkv, rel_h, rel_w, num_heads, dk, dv, scale):
        B, _, H, W = qkv.shape
        return qkv.new_empty(B, dv, H, W), qkv.new_empty(B, num_heads, H * W)

    @torch.library.register_fake("aa_detection::attention_backward")
    def _attention_backward_fake(dout, qkv, rel_h, rel_w, out, lse, num_heads, dk, dv, scale):
        return torch.empty_like(qkv), torch.empty_like(rel_h), torch.empty_like(rel_w)

    def _setup_context(ctx, inputs, output):
        qkv, rel_h, rel_w, num_heads, dk, dv, scale = inputs
        ctx.save_for_backward(qkv, rel_h, rel_w, *output)
        ctx.args = (num_heads, dk, dv, scale)

    def _backward(ctx, grad_out, grad_lse):
        """Recomputes the probabilities from the saved log-sum-exp; gradients of qkv and both tables."""
        qkv, rel_h, rel_w, out, lse = ctx.saved_tensors
        dqkv, drel_h, drel_w = torch.ops.aa_detection.attention_backward(
            grad_out.contiguous(), qkv, rel_h, rel_w, out, lse, *ctx.args)
        return dqkv, drel_h, drel_w, None, None, None, None

    torch.library.register_autograd("aa_detection::attention_forward", _backward, setup_context=_setup_context)


def kernel_attention(qkv: torch.Tensor, num_heads: int, dk: int, dv: int, rel_h: Optional[torch.Tensor] = None,
                     rel_w: Optional[torch.Tensor] = None, layer: str = "attention") -> torch.Tensor:
    """qkv (B, 2 dk + dv, H, W) -> (B, dv, H, W) through the compiled kernel, in fp32 (inputs of other
    dtypes, e.g. bfloat16 under autocast, are converted and the output converted back).

    Per query the H + W relative logits are computed from the tables, then key rows are visited with an
    online softmax, so the (HW, HW) logits are never stored; backward recomputes them from the saved
    log-sum-exp and returns the gradients of qkv and of both tables directly. `layer` names the caller
    in errors."""
    if qkv.device.type != "cpu" or _C is None:
        raise RuntimeError(f"{layer}: impl='kernel' needs the compiled CPU kernel aa_detection._C and CPU tensors")
    if max(dk, dv) // num_heads > KERNEL_MAX_HEAD_WIDTH:
        raise RuntimeError(f"{layer}: impl='kernel' takes head widths up to {KERNEL_MAX_HEAD_WIDTH}, got "
                           f"dkh={dk // num_heads}, dvh={dv // num_heads}; use 'fused' or 'auto'")
    dtype = qkv.dtype
    scale = 1.0 / math.sqrt(dk // num_heads)
    if rel_h is None:  # content-only attention: 0-element tables
        rel_h = rel_w = qkv.new_empty(0, dtype=torch.float32)
    qkv, rel_h, rel_w = (t.float().contiguous() for t in (qkv, rel_h, rel_w))
    out, _ = torch.ops.aa_detection.attention_forward(qkv, rel_h, rel_w, num_heads, dk, dv, scale)
    return out.to(dtype)


def attend(q, k, v, rel_h, rel_w, scale, layer="attention"):
    """The kernel as an attention path: q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh) -> (B, Nh, H, W, dvh),
    packed into the qkv layout (one copy); `relative_attention_qkv` calls `kernel_attention` on its qkv
    directly."""
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    if not math.isclose(scale, 1.0 / math.sqrt(dkh)):
        raise ValueError("the kernel path uses the scale 1/sqrt(dkh)")
    qkv = torch.cat([t.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W) for t in (q.float(), k.float(), v.float())], 1)
    out = kernel_attention(qkv, Nh, Nh * dkh, Nh * dvh, rel_h, rel_w, layer)
    return out.reshape(B, Nh, dvh, H, W).permute(0, 1, 3, 4, 2).to(v.dtype)
