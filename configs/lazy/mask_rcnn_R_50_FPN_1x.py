"""R-50 Mask R-CNN, 1x: detectron2's LazyConfig model-zoo entry, with its own output folder.

    python tools/train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_1x.py
"""
from detectron2.model_zoo import get_config

_zoo = get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _zoo.model, _zoo.dataloader, _zoo.optimizer, _zoo.lr_multiplier, _zoo.train)
train.output_dir = "output/lazy/mask_rcnn_R_50_FPN_1x"
