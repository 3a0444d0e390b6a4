"""R-101 RetinaNet, 3x schedule."""
from .retinanet_R_50_FPN_3x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
train.output_dir = "output/lazy/retinanet_R_101_FPN_3x"
