"""R-50 Faster R-CNN, 1x: detectron2's Mask R-CNN LazyConfig without its mask head (as detectron2's docs
build Faster R-CNN), with its own output folder."""
from .mask_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False
train.output_dir = "output/lazy/faster_rcnn_R_50_FPN_1x"
