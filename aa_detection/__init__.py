"""Attention Augmented Convolutional Networks (Bello et al., ICCV 2019) for detectron2.

`aa_detection.layers` needs only torch. The detectron2 parts (config, backbones, tools) live in
`aa_detection.config` and `aa_detection.modeling`.
"""
__version__ = "0.1.0"
