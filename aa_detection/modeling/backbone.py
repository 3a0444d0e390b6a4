"""AA-ResNet: detectron2's ResNet with the 3x3 convolutions of chosen stages attention-augmented.

Parameter names stay detectron2's (`stem`, `res2`..`res5`, `resX.Y.conv2.weight`, `resX.Y.conv2.norm.*`),
so ImageNet ResNet weights load by name; see `aa_detection.checkpoint.AACheckpointer` for the conv branch.
"""
import math
from typing import Optional, Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)
import fvcore.nn.weight_init as weight_init

from ..layers import AAConv2d, AttentionSpec

__all__ = [
    "AABasicBlock",
    "AABottleneckBlock",
    "STAGE_NAMES",
    "build_aa_resnet_backbone",
    "build_aa_resnet_fpn_backbone",
    "build_retinanet_aa_resnet_fpn_backbone",
    "aa_resnet",
    "aa_resnet_arguments",
    "aa_norms",
    "max_input_size",
    "relative_table_size",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def aa_norms(norm: str, attention_norm: str, out_channels: int, value_depth: int):
    """(norm, attention_norm) modules of an AAConv2d with `out_channels` outputs, dv = `value_depth`.

    `attention_norm` "" (MODEL.AA.NORM's default) keeps a trained block norm (BN, SyncBN, GN, ...) over the
    concatenation, the paper's design, and gives the attention channels of a frozen one (FrozenBN, whose
    statistics belong to pretrained filters) a trained BN of their own. Any other norm name ("SyncBN" to
    share the statistics across GPUs) normalises the attention channels with it, and the convolution
    channels with the block's.
    """
    if not attention_norm and norm != "FrozenBN":
        return get_norm(norm, out_channels), None
    try:
        return get_norm(norm, out_channels - value_depth), get_norm(attention_norm or "BN", value_depth)
    except ValueError as e:  # e.g. GroupNorm's 32 groups over fewer or indivisible channels
        raise ValueError(f"MODEL.AA.NORM={attention_norm!r} with MODEL.RESNETS.NORM={norm!r} cannot normalise "
                         f"{value_depth} attention and {out_channels - value_depth} convolution channels: {e}") from e


def _aa_conv(in_channels, out_channels, *, stride, dilation, norm, aa):
    """AAConv2d with the block's norm and the attention channels' (aa["norm"], see `aa_norms`)."""
    aa = dict(aa)
    attention_norm = aa.pop("norm", "")
    conv = AAConv2d(in_channels, out_channels, 3, stride=stride, dilation=dilation, **aa)
    conv.norm, conv.attention_norm = aa_norms(norm, attention_norm, out_channels, conv.value_depth)
    conv.reset_parameters()  # attention_gain in the norms just set
    weight_init.c2_msra_fill(conv)  # the conv branch starts like detectron2's convolutions
    return conv


class AABottleneckBlock(BottleneckBlock):
    """detectron2's BottleneckBlock whose 3x3 convolution `conv2` is an AAConv2d (then the block's norm).

    `aa` holds the AAConv2d keyword arguments: num_heads, kappa, upsilon, relative, max_relative_size, impl.
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, aa=None):
        if num_groups != 1:
            raise ValueError(
                f"MODEL.RESNETS.NUM_GROUPS={num_groups}: attention-augmented stages need plain (ungrouped) 3x3 "
                "convolutions, NUM_GROUPS must be 1"
            )
        super().__init__(
            in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
            num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation,
        )
        self.conv2 = _aa_conv(
            bottleneck_channels, bottleneck_channels, stride=1 if stride_in_1x1 else stride, dilation=dilation,
            norm=norm, aa=aa or {},
        )


class AABasicBlock(BasicBlock):
    """detectron2's BasicBlock with BOTH of its 3x3 convolutions, `conv1` (which carries the block's stride)
    and `conv2`, attention-augmented, each followed by the block's norm."""

    def __init__(self, in_channels, out_channels, *, stride=1, norm="BN", aa=None):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        aa = aa or {}
        self.conv1 = _aa_conv(in_channels, out_channels, stride=stride, dilation=1, norm=norm, aa=aa)
        self.conv2 = _aa_conv(out_channels, out_channels, stride=1, dilation=1, norm=norm, aa=aa)


def relative_table_size(max_input_size: int, stride: int) -> int:
    """Rows per side of the relative tables of a layer attending over a map of this stride: the longest
    side that map can have, ceil(max_input_size / stride), where max_input_size is the longest padded
    image side. Offsets beyond it would clip to the tables' last rows."""
    return max(1, math.ceil(max_input_size / stride))


def max_input_size(cfg: CfgNode, size_divisibility: int = 1) -> int:
    """The longest image side the config can feed the backbone: the largest of INPUT.MAX_SIZE_TRAIN and
    INPUT.MAX_SIZE_TEST (ResizeShortestEdge caps the long side there), padded up to `size_divisibility`."""
    longest = max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
    divisibility = max(size_divisibility, 1)
    return -(-longest // divisibility) * divisibility


def aa_resnet(
    *,
    depth: int = 50,
    out_features: Sequence[str] = ("res3", "res4", "res5"),
    in_channels: int = 3,
    norm: str = "FrozenBN",
    stem_out_channels: int = 64,
    res2_out_channels: Optional[int] = None,
    width_per_group: int = 64,
    num_groups: int = 1,
    stride_in_1x1: bool = False,
    res5_dilation: int = 1,
    deform_on_per_stage: Sequence[bool] = (False, False, False, False),
    deform_modulated: bool = False,
    deform_num_groups: int = 1,
    freeze_at: int = 0,
    aa_stages: Sequence[str] = AttentionSpec.aa_stages,
    num_heads: int = AttentionSpec.num_heads,
    kappa: float = AttentionSpec.kappa,
    upsilon: float = AttentionSpec.upsilon,
    relative: bool = AttentionSpec.relative,
    impl: str = AttentionSpec.impl,
    attention_norm: str = AttentionSpec.attention_norm,
    attention_gain: float = AttentionSpec.attention_gain,
    downsample_stages: Sequence[str] = AttentionSpec.downsample_stages,
    max_input_size: int = 1344,
    num_classes: Optional[int] = None,
) -> ResNet:
    """detectron2's ResNet with the 3x3 convolutions of `aa_stages` attention-augmented, from explicit
    arguments (the YAML builder `build_aa_resnet_backbone` and the LazyConfigs both call this).

    The ResNet arguments mean what detectron2's MODEL.RESNETS keys mean (res2_out_channels defaults to 64
    for depths below 50, 256 otherwise). The attention arguments are the fields of `AttentionSpec`
    (MODEL.AA's keys, their defaults and meanings; `attention_norm` as `aa_norms` reads it), and
    `max_input_size` is the longest padded image side, which sizes the relative tables.
    `num_classes` adds detectron2's classifier head (`avgpool`, `linear`; output "linear").
    """
    stages_set, downsampled = set(aa_stages), set(downsample_stages)
    for name, value in (("MODEL.AA.STAGES (aa_stages)", stages_set),
                        ("MODEL.AA.DOWNSAMPLE_STAGES (downsample_stages)", downsampled)):
        if not value <= set(STAGE_NAMES):
            raise ValueError(f"{name}={sorted(value)}: allowed values are {list(STAGE_NAMES)}")
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH (depth)={depth}: allowed values are {sorted(RESNET_BLOCKS)}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation={res5_dilation}: allowed values are 1 and 2")
    if res2_out_channels is None:
        res2_out_channels = 64 if depth < 50 else 256
    if depth < 50 and (res2_out_channels != 64 or num_groups != 1 or res5_dilation != 1 or any(deform_on_per_stage)):
        raise ValueError(
            f"ResNet-{depth} needs MODEL.RESNETS.RES2_OUT_CHANNELS=64, NUM_GROUPS=1, RES5_DILATION=1 and no "
            "DEFORM_ON_PER_STAGE"
        )
    frozen = [name for i, name in enumerate(STAGE_NAMES) if name in stages_set and i + 2 <= freeze_at]
    if frozen:
        raise ValueError(
            f"MODEL.AA.STAGES (aa_stages) includes {frozen}, which MODEL.BACKBONE.FREEZE_AT (freeze_at)={freeze_at} "
            f"freezes: its attention would never train. Use FREEZE_AT <= {STAGE_NAMES.index(frozen[0]) + 1} or "
            "leave the stage out of MODEL.AA.STAGES")
    aa_common = dict(num_heads=num_heads, kappa=kappa, upsilon=upsilon, relative=relative, impl=impl,
                     norm=attention_norm, attention_gain=attention_gain)

    stem = BasicStem(in_channels=in_channels, out_channels=stem_out_channels, norm=norm)
    stride = stem.stride
    in_ch, out_ch = stem_out_channels, res2_out_channels
    bottleneck = num_groups * width_per_group
    stages = []
    for i, (name, num_blocks) in enumerate(zip(STAGE_NAMES, RESNET_BLOCKS[depth])):
        dilation = res5_dilation if name == "res5" else 1
        first_stride = 1 if i == 0 or dilation == 2 else 2
        stride *= first_stride
        kwargs = dict(
            num_blocks=num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_ch, out_channels=out_ch, norm=norm,
        )
        is_aa = name in stages_set
        if is_aa:
            factor = 2 if name in downsampled else 1
            kwargs["aa"] = dict(aa_common, attention_downsample=factor,
                                max_relative_size=relative_table_size(max_input_size, stride * factor))
            if deform_on_per_stage[i]:
                raise ValueError(f"{name} cannot be both in MODEL.AA.STAGES and deformable (DEFORM_ON_PER_STAGE)")
        if depth < 50:
            kwargs["block_class"] = AABasicBlock if is_aa else BasicBlock
        else:
            kwargs.update(
                bottleneck_channels=bottleneck, stride_in_1x1=stride_in_1x1, dilation=dilation, num_groups=num_groups,
            )
            if is_aa:
                kwargs["block_class"] = AABottleneckBlock
            elif deform_on_per_stage[i]:
                kwargs.update(block_class=DeformBottleneckBlock, deform_modulated=deform_modulated,
                              deform_num_groups=deform_num_groups)
            else:
                kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**kwargs))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    resnet = ResNet(stem, stages, num_classes=num_classes, out_features=list(out_features), freeze_at=freeze_at)
    for name, module in resnet.named_modules():
        if isinstance(module, AAConv2d):
            module.layer_name = name  # e.g. "res3.0.conv2", named in attention errors
    return resnet


def aa_resnet_arguments(cfg: CfgNode, input_shape: ShapeSpec, size_divisibility: int = 1) -> dict:
    """The `aa_resnet` arguments a YAML config gives (MODEL.RESNETS, MODEL.BACKBONE.FREEZE_AT, MODEL.AA, INPUT)."""
    r = cfg.MODEL.RESNETS
    return dict(
        depth=r.DEPTH, out_features=r.OUT_FEATURES, in_channels=input_shape.channels, norm=r.NORM,
        stem_out_channels=r.STEM_OUT_CHANNELS, res2_out_channels=r.RES2_OUT_CHANNELS,
        width_per_group=r.WIDTH_PER_GROUP, num_groups=r.NUM_GROUPS, stride_in_1x1=r.STRIDE_IN_1X1,
        res5_dilation=r.RES5_DILATION, deform_on_per_stage=r.DEFORM_ON_PER_STAGE,
        deform_modulated=r.DEFORM_MODULATED, deform_num_groups=r.DEFORM_NUM_GROUPS,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, **AttentionSpec.from_config(cfg.MODEL.AA).as_kwargs(),
        max_input_size=max_input_size(cfg, size_divisibility),
    )


@BACKBONE_REGISTRY.register()
def build_aa_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet (MODEL.RESNETS.*: DEPTH, STRIDE_IN_1X1, NORM, widths, RES5_DILATION, OUT_FEATURES;
    MODEL.BACKBONE.FREEZE_AT) with the stages in MODEL.AA.STAGES attention-augmented."""
    return aa_resnet(**aa_resnet_arguments(cfg, input_shape))


def _aa_resnet_fpn(cfg: CfgNode, input_shape: ShapeSpec, top_block) -> FPN:
    """AA-ResNet + FPN over MODEL.FPN.IN_FEATURES; the relative tables cover the FPN's padded sizes
    (multiples of the largest input feature's stride)."""
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    divisibility = max(strides[f] for f in cfg.MODEL.FPN.IN_FEATURES)
    bottom_up = aa_resnet(**aa_resnet_arguments(cfg, input_shape, divisibility))
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block(bottom_up),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_aa_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """AA-ResNet + FPN with P6, P7 computed from res5 (P3-P7), as RetinaNet's ResNet-FPN backbone."""
    return _aa_resnet_fpn(cfg, input_shape, lambda bottom_up: LastLevelP6P7(
        bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS))


@BACKBONE_REGISTRY.register()
def build_aa_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """AA-ResNet + FPN with P6 max-pooled from P5 (P2-P6 over res2-res5), as detectron2's
    build_resnet_fpn_backbone for Faster and Mask R-CNN."""
    return _aa_resnet_fpn(cfg, input_shape, lambda bottom_up: LastLevelMaxPool())
