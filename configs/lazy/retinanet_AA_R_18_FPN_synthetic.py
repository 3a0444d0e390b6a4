"""The twin of retinanet_R_18_FPN_synthetic.py with an AA-ResNet-18 (MODEL.AA defaults as explicit arguments):
the LazyConfig of configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml."""
from detectron2.config import LazyCall as L

from aa_detection.modeling import aa_resnet

from .retinanet_R_18_FPN_synthetic import dataloader, datasets, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(aa_resnet)(
    depth=18,
    norm="BN",
    freeze_at=0,
    out_features=["res3", "res4", "res5"],
    aa_stages=["res3", "res4", "res5"],
    num_heads=8,
    kappa=0.2,
    upsilon=0.1,
    downsample_stages=["res3"],
    max_input_size=256,  # the longest training and test side, a multiple of the FPN's 32
)
train.output_dir = "output/lazy/retinanet_AA_R_18_FPN_synthetic"
