#!/usr/bin/env python
"""Convert a pretrained ResNet / AA-ResNet classifier to detectron2 weights for the (AA) RetinaNet.

    python tools/convert_pretrained_to_d2.py SRC DST.pth [--config-file CFG] [KEY VALUE ...]

SRC: a checkpoint of tools/pretrain_backbone.py (EMA weights when it has them), a torchvision or timm
ResNet state dict, or a Caffe2 ResNet .pkl such as detectron2's MSRA weights (detectron2://... paths too).
With --config-file (and overrides) the relative tables are sized for that config and a backbone of another
architecture is refused; without it they cover --max-input-size. DST.json gets the
pixel mean/std and input format the weights need (set MODEL.PIXEL_MEAN, MODEL.PIXEL_STD, INPUT.FORMAT).
"""
import argparse
import json
import sys

from aa_detection.config import add_trust_config_argument, setup_cfg
from aa_detection.errors import exit_on_user_error
from aa_detection.pretraining.convert import convert_pretrained


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("src", help="classifier checkpoint, torchvision/timm ResNet weights or an MSRA .pkl")
    parser.add_argument("dst", help="detectron2 weights to write (.pth)")
    parser.add_argument("--config-file", default=None, help="the detection config the weights are for")
    add_trust_config_argument(parser)
    parser.add_argument("--max-input-size", type=int, default=1344,
                        help="longest padded image side the relative tables cover, without --config-file")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help="which weights of a classifier checkpoint (auto: EMA when present)")
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ... (with --config-file)")
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error():
        cfg = None
        if args.config_file:
            cfg = setup_cfg(args.config_file, args.opts, trusted=args.trust_config)
        metadata = convert_pretrained(args.src, args.dst, cfg=cfg, max_input_size=args.max_input_size,
                                      weights=args.weights)
    print(f"wrote {args.dst} ({metadata['source']}); the config needs:")
    print(json.dumps({"MODEL.PIXEL_MEAN": metadata["pixel_mean"], "MODEL.PIXEL_STD": metadata["pixel_std"],
                      "INPUT.FORMAT": metadata["input_format"]}))


if __name__ == "__main__":
    sys.exit(main())
