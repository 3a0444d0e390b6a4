"""The twin of faster_rcnn_R_50_FPN_1x.py with the AA-ResNet-50 of retinanet_AA_R_50_FPN_1x.py (MODEL.AA defaults
as explicit arguments), giving res2-res5 to the FPN (P2-P6)."""
from .faster_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train
from .retinanet_AA_R_50_FPN_1x import model as _retinanet

model.backbone.bottom_up = _retinanet.backbone.bottom_up
model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
train.output_dir = "output/lazy/faster_rcnn_AA_R_50_FPN_1x"
