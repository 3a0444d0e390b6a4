"""detectron2 modeling parts: the AA-ResNet backbones (registered in detectron2's BACKBONE_REGISTRY)."""
from .backbone import (
    AABasicBlock,
    AABottleneckBlock,
    build_aa_resnet_backbone,
    build_retinanet_aa_resnet_fpn_backbone,
    relative_table_size,
)

__all__ = [
    "AABasicBlock",
    "AABottleneckBlock",
    "build_aa_resnet_backbone",
    "build_retinanet_aa_resnet_fpn_backbone",
    "relative_table_size",
]
