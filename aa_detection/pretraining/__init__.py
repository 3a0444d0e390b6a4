"""Backbone pretraining and weight conversion.

- `classifiers`: the AA-ResNet (and plain detectron2 ResNet) classifiers in timm's registry
  (`aa_resnet18`..`aa_resnet101`, `d2_resnet18`..`d2_resnet101`; needs timm);
- `train`: their ImageNet-style training loop (`tools/pretrain_backbone.py`);
- `convert`: torchvision / timm / Caffe2 / pretrained-classifier weights as detectron2 weights
  (`tools/convert_pretrained_to_d2.py`) and the check that weights fit a config's input format.
"""
