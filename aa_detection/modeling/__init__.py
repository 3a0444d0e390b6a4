"""detectron2 modeling parts: the AA-ResNet backbones (registered in detectron2's BACKBONE_REGISTRY) and the
attention liveness probe."""
from .backbone import (
    AABasicBlock,
    AABottleneckBlock,
    aa_resnet,
    aa_resnet_arguments,
    build_aa_resnet_backbone,
    build_aa_resnet_fpn_backbone,
    build_retinanet_aa_resnet_fpn_backbone,
    max_input_size,
    relative_table_size,
)

__all__ = [
    "AABasicBlock",
    "AABottleneckBlock",
    "aa_resnet",
    "aa_resnet_arguments",
    "build_aa_resnet_backbone",
    "build_aa_resnet_fpn_backbone",
    "build_retinanet_aa_resnet_fpn_backbone",
    "max_input_size",
    "relative_table_size",
]
