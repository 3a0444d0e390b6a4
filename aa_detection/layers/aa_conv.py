"""The attention-augmented convolution: concat(Conv(X), MHA(X)) along channels."""
import contextlib
import math
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .relative_attention import check_impl, relative_attention_qkv
from .relative_logits import split_heads
from .spec import AttentionSpec

__all__ = ["AAConv2d", "attention_depths"]


def attention_depths(out_channels: int, num_heads: int, kappa: float, upsilon: float) -> Tuple[int, int]:
    """Key and value depths (dk, dv) from the ratios kappa = dk / Fout and upsilon = dv / Fout.

    Rounding rule: each depth is the multiple of num_heads nearest to ratio * out_channels, and at
    least num_heads (one dimension per head). R-50 with Nh=8, kappa=0.2, upsilon=0.1 gives
    (24, 16) at Fout=128, (48, 24) at 256 and (104, 48) at 512.
    """
    def depth(ratio: float) -> int:
        return num_heads * max(1, round(ratio * out_channels / num_heads))

    return depth(kappa), depth(upsilon)


class AAConv2d(nn.Module):
    """Attention-augmented convolution (Bello et al., 2019), x (B, Cin, H, W) -> (B, Cout, H', W').

    The first Cout - dv channels are a k x k convolution (its filters are the parameter `weight`,
    named like a plain convolution's so pretrained 3x3 kernels load by name); the last dv channels are
    multi-head self-attention with 2D relative position logits, projected by a 1x1 convolution.
    With stride 2 the attention runs on x average-pooled 2x2 (ceil mode), the convolution's output size.
    With `attention_downsample` 2 it runs on a map pooled once more by 2 (the paper's way of keeping the
    largest maps affordable), and its projected output is upsampled bilinearly to the convolution's size
    before the concatenation.

    `norm` and `activation`, when given, follow the concatenation, as in detectron2's Conv2d: the paper's
    batch norm after the augmented convolution, which learns to weigh the two branches. With
    `attention_norm` the branches are normalised apart, `norm` over the Fout - dv convolution channels and
    `attention_norm` over the dv attention channels: a frozen norm of pretrained filters (FrozenBN) then
    leaves the attention a trained norm with statistics of its own. `attention_gain` is the initial weight
    of the attention channels in the norm that covers them (1 is a norm's own initialisation): below 1
    the attention starts small, never at exact zeros, which a following ReLU would never pass a gradient.

    Inside `with layer.recording_attention() as maps:` the layer runs the naive path (dense softmax
    weights) and appends each forward's weights, detached, to `maps`: (B, Nh, h, w, h, w), (h, w) =
    attention_size(H', W') for an output of H' x W'; entry [..., y, x, :, :] is the map of query pixel
    (y, x) over all keys, the very weights that produced the layer's output.

    Relative embeddings depend on the offset only: each axis has a table of 2 * max_relative_size - 1
    rows, shared by all heads and all input sizes, and offsets beyond +-(max_relative_size - 1) use the
    table's last row on their side. Size it from the largest feature map expected.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        dilation=1,
        *,
        num_heads=AttentionSpec.num_heads,
        key_depth=None,
        value_depth=None,
        kappa=AttentionSpec.kappa,
        upsilon=AttentionSpec.upsilon,
        relative=AttentionSpec.relative,
        max_relative_size=64,
        impl=AttentionSpec.impl,
        attention_downsample=1,
        attention_gain=AttentionSpec.attention_gain,
        bias=False,
        norm=None,
        attention_norm=None,
        activation=None,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        default_dk, default_dv = attention_depths(out_channels, num_heads, kappa, upsilon)
        dk = default_dk if key_depth is None else key_depth
        dv = default_dv if value_depth is None else value_depth
        for name, depth in (("key_depth (dk)", dk), ("value_depth (dv)", dv)):
            if depth < 1 or depth % num_heads:
                raise ValueError(f"{name}={depth} must be a positive multiple of num_heads={num_heads}")
        if dv >= out_channels:
            raise ValueError(
                f"value_depth (dv)={dv} must be < out_channels={out_channels} to leave channels to the convolution"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if attention_downsample not in (1, 2):
            raise ValueError(f"attention_downsample must be 1 or 2, got {attention_downsample}")
        check_impl(impl)
        if not attention_gain > 0:
            raise ValueError(
                f"attention_gain must be > 0 (a zero start never trains behind a ReLU), got {attention_gain}")
        if relative and max_relative_size < 1:
            raise ValueError(f"max_relative_size must be >= 1, got {max_relative_size}")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.attention_downsample = attention_downsample
        self.padding = dilation * (kernel_size // 2)
        self.num_heads, self.key_depth, self.value_depth = num_heads, dk, dv
        self.impl = impl
        self.layer_name = "AAConv2d"  # how errors name the layer; a backbone sets its module path
        self._attention_maps: Optional[List[torch.Tensor]] = None  # see recording_attention

        self.weight = nn.Parameter(torch.empty(out_channels - dv, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels - dv)) if bias else None
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1)
        self.attn_out = nn.Conv2d(dv, dv, 1)
        dkh = dk // num_heads
        if relative:
            self.rel_h = nn.Parameter(torch.randn(2 * max_relative_size - 1, dkh) * dkh**-0.5)
            self.rel_w = nn.Parameter(torch.randn(2 * max_relative_size - 1, dkh) * dkh**-0.5)
        else:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)
        self.norm = norm
        self.attention_norm = attention_norm
        self.activation = activation
        self.attention_gain = attention_gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The convolution branch as nn.Conv2d initialises its weight; the weight of the attention channels
        in their norm (when it has one) at `attention_gain`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        scale = self.attention_scale()
        if scale is not None:
            with torch.no_grad():
                scale.fill_(self.attention_gain)

    def attention_scale(self) -> Optional[torch.Tensor]:
        """The affine weight of the attention channels in the norm that covers them (dv,), a view; None
        without a norm, or with one that has no per-channel weight."""
        norm = self.norm if self.attention_norm is None else self.attention_norm
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return None
        return weight[-self.value_depth:]

    @property
    def relative(self) -> bool:
        return self.rel_h is not None

    def attention_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the map the attention runs on for a convolution output of (height, width)."""
        d = self.attention_downsample
        return -(-height // d), -(-width // d)

    def attention_flops(self, output: torch.Tensor) -> int:
        """Multiply-adds of the attention core for an output (B, Cout, H', W'): q.k and p.v over all
        (hw)^2 pairs of the attention map (h, w) = attention_size(H', W') and, with relative positions,
        the logits q.r^H and q.r^W."""
        B, _, H, W = (int(d) for d in output.shape)  # plain ints, also under tracing
        H, W = self.attention_size(H, W)
        hw = H * W
        dkh, dvh = self.key_depth // self.num_heads, self.value_depth // self.num_heads
        relative = hw * (H + W) * dkh if self.relative else 0
        return B * self.num_heads * (hw * hw * (dkh + dvh) + relative)

    def split_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, Cin, H, W), the attention input -> q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh)."""
        return split_heads(self.qkv(x), self.num_heads, self.key_depth, self.value_depth)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W) -> the input of the attention branch, of attention_size(convolution output size)."""
        for factor in (self.stride, self.attention_downsample):
            if factor == 2:  # 2x2 average pooling, ceil mode: the sizes of a strided 3x3 convolution
                x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        return x

    @contextlib.contextmanager
    def recording_attention(self) -> Iterator[List[torch.Tensor]]:
        """Record the attention maps: within the block the layer runs the naive path and appends each
        forward's softmax weights (B, Nh, h, w, h, w), detached, to the list it yields."""
        maps: List[torch.Tensor] = []
        previous, self._attention_maps = self._attention_maps, maps
        try:
            yield maps
        finally:
            self._attention_maps = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        a = self.attention_input(x)
        # (B, dv, H, W) straight from the qkv convolution's output: the kernel path reads that layout as it
        # is and writes its output in the layout the projection reads.
        maps = self._attention_maps
        attn = relative_attention_qkv(self.qkv(a), self.num_heads, self.key_depth, self.value_depth,
                                      self.rel_h, self.rel_w, impl=self.impl if maps is None else "naive",
                                      layer=self.layer_name, on_weights=None if maps is None else maps.append)
        attn = self.attn_out(attn)
        if self.attention_downsample > 1:
            attn = F.interpolate(attn, size=conv.shape[-2:], mode="bilinear", align_corners=False)
        if self.attention_norm is not None:
            if self.norm is not None:
                conv = self.norm(conv)
            out = torch.cat([conv, self.attention_norm(attn)], dim=1)
        else:
            out = torch.cat([conv, attn], dim=1)
            if self.norm is not None:
                out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_heads={self.num_heads}, dk={self.key_depth}, dv={self.value_depth}, "
            f"relative={self.relative}, impl={self.impl!r}"
            + (f", attention_downsample={self.attention_downsample}" if self.attention_downsample > 1 else "")
        )
