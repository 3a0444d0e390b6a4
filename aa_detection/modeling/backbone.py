"""AA-ResNet: detectron2's ResNet with the 3x3 convolutions of chosen stages attention-augmented.

Parameter names stay detectron2's (`stem`, `res2`..`res5`, `resX.Y.conv2.weight`, `resX.Y.conv2.norm.*`),
so ImageNet ResNet weights load by name; see `aa_detection.checkpoint.AACheckpointer` for the conv branch.
"""
import math

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)
import fvcore.nn.weight_init as weight_init

from ..layers import AAConv2d

__all__ = [
    "AABasicBlock",
    "AABottleneckBlock",
    "STAGE_NAMES",
    "check_aa_stages",
    "build_aa_resnet_backbone",
    "build_retinanet_aa_resnet_fpn_backbone",
    "relative_table_size",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _aa_conv(in_channels, out_channels, *, stride, dilation, norm, aa):
    conv = AAConv2d(
        in_channels, out_channels, 3, stride=stride, dilation=dilation, norm=get_norm(norm, out_channels), **aa
    )
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


def relative_table_size(cfg, stage_stride):
    """Rows per side of each relative table at a stage of this stride: ceil(INPUT.MAX_SIZE_TRAIN / stride),
    the longest feature map seen in training. Offsets beyond the largest training map clip to the last row."""
    return max(1, math.ceil(cfg.INPUT.MAX_SIZE_TRAIN / stage_stride))


def check_aa_stages(cfg):
    """The set of MODEL.AA.STAGES; ValueError naming the key and the allowed values if one is unknown."""
    stages = list(cfg.MODEL.AA.STAGES)
    bad = [s for s in stages if s not in STAGE_NAMES]
    if bad:
        raise ValueError(f"MODEL.AA.STAGES={stages} has {bad}: allowed values are {list(STAGE_NAMES)}")
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth}: allowed values are {sorted(RESNET_BLOCKS)}")
    return set(stages)


@BACKBONE_REGISTRY.register()
def build_aa_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet (MODEL.RESNETS.*: DEPTH, STRIDE_IN_1X1, NORM, widths, RES5_DILATION, OUT_FEATURES;
    MODEL.BACKBONE.FREEZE_AT) with the stages in MODEL.AA.STAGES attention-augmented."""
    augmented = check_aa_stages(cfg)
    r = cfg.MODEL.RESNETS
    depth, norm = r.DEPTH, r.NORM
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION={r.RES5_DILATION}: allowed values are 1 and 2")
    if depth < 50 and (r.RES2_OUT_CHANNELS != 64 or r.NUM_GROUPS != 1 or r.RES5_DILATION != 1
                       or any(r.DEFORM_ON_PER_STAGE)):
        raise ValueError(
            f"ResNet-{depth} needs MODEL.RESNETS.RES2_OUT_CHANNELS=64, NUM_GROUPS=1, RES5_DILATION=1 and no "
            "DEFORM_ON_PER_STAGE"
        )
    aa_common = dict(
        num_heads=cfg.MODEL.AA.NUM_HEADS, kappa=cfg.MODEL.AA.KAPPA, upsilon=cfg.MODEL.AA.UPSILON,
        relative=cfg.MODEL.AA.RELATIVE, impl=cfg.MODEL.AA.IMPL,
    )

    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    stride = stem.stride
    in_ch, out_ch = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for i, (name, num_blocks) in enumerate(zip(STAGE_NAMES, RESNET_BLOCKS[depth])):
        dilation = r.RES5_DILATION if name == "res5" else 1
        first_stride = 1 if i == 0 or dilation == 2 else 2
        stride *= first_stride
        kwargs = dict(
            num_blocks=num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_ch, out_channels=out_ch, norm=norm,
        )
        is_aa = name in augmented
        if is_aa:
            kwargs["aa"] = dict(aa_common, max_relative_size=relative_table_size(cfg, stride))
            if r.DEFORM_ON_PER_STAGE[i]:
                raise ValueError(f"{name} cannot be both in MODEL.AA.STAGES and deformable (DEFORM_ON_PER_STAGE)")
        if depth < 50:
            kwargs["block_class"] = AABasicBlock if is_aa else BasicBlock
        else:
            kwargs.update(
                bottleneck_channels=bottleneck, stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilation,
                num_groups=r.NUM_GROUPS,
            )
            if is_aa:
                kwargs["block_class"] = AABottleneckBlock
            elif r.DEFORM_ON_PER_STAGE[i]:
                kwargs.update(block_class=DeformBottleneckBlock, deform_modulated=r.DEFORM_MODULATED,
                              deform_num_groups=r.DEFORM_NUM_GROUPS)
            else:
                kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**kwargs))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    resnet = ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    for name, module in resnet.named_modules():
        if isinstance(module, AAConv2d):
            module.layer_name = name  # e.g. "res3.0.conv2", named in attention errors
    return resnet


@BACKBONE_REGISTRY.register()
def build_retinanet_aa_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """AA-ResNet + FPN with P6, P7 computed from res5 (P3-P7), as RetinaNet's ResNet-FPN backbone."""
    bottom_up = build_aa_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
