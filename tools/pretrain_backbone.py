#!/usr/bin/env python
"""Pretrain an AA-ResNet (or its plain twin) as an image classifier on an ImageFolder dataset.

    python tools/pretrain_backbone.py --data DIR --model aa_resnet50 --epochs 100 --batch-size 128 --output DIR
    torchrun --nproc_per_node 8 tools/pretrain_backbone.py --data /data/imagenet --output output/aa_r50_in1k
    python tools/pretrain_backbone.py ... --resume     # continue from OUTPUT/last.pth

See aa_detection/pretraining/train.py (recipe, files written) and README.md, "Pretraining the backbone".
"""
import sys

from aa_detection.errors import exit_on_user_error
from aa_detection.pretraining.train import build_argument_parser, pretrain


def main(argv=None):
    pretrain(build_argument_parser().parse_args(argv))


if __name__ == "__main__":
    with exit_on_user_error():  # e.g. a --data folder without train/ and val/: its message and exit status 2
        sys.exit(main())
