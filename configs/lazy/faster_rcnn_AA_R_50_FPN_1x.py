"""The twin of faster_rcnn_R_50_FPN_1x.py with an AA-ResNet-50 (MODEL.AA defaults as explicit arguments)."""
from detectron2.config import LazyCall as L

from aa_detection.modeling import aa_resnet

from .faster_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(aa_resnet)(
    depth=50,
    norm="FrozenBN",
    stride_in_1x1=True,
    freeze_at=2,
    out_features=["res2", "res3", "res4", "res5"],
    aa_stages=["res3", "res4", "res5"],
    num_heads=8,
    kappa=0.2,
    upsilon=0.1,
    downsample_stages=["res3"],
    max_input_size=1344,  # 1333, the longest training and test side, padded to the FPN's multiple of 32
)
train.output_dir = "output/lazy/faster_rcnn_AA_R_50_FPN_1x"
