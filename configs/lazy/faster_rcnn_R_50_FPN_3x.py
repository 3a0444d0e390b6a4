"""R-50 Faster R-CNN, 3x schedule (detectron2's 3x steps)."""
from detectron2.model_zoo import get_config

from .faster_rcnn_R_50_FPN_1x import dataloader, model, optimizer, train

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
train.output_dir = "output/lazy/faster_rcnn_R_50_FPN_3x"
