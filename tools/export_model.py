#!/usr/bin/env python
"""Export a trained RetinaNet (AA-ResNet or ResNet backbone) for deployment.

    python tools/export_model.py --config-file CFG --output DIR MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file CFG --output DIR --format export --sample-image img.jpg
    python tools/export_model.py --config-file CFG --output DIR --format onnx MODEL.WEIGHTS model_final.pth

"torchscript" writes DIR/model.ts (+ model.ts.json naming its outputs), the whole detector traced at the
sample image's size (it runs at other sizes); "export" writes DIR/backbone.pt2, the backbone through
torch.export with dynamic height and width (load either after `import aa_detection`); "onnx" writes
DIR/backbone.onnx, the same backbone in ONNX (attention on the pure-PyTorch path; needs onnx and onnxscript).
"""
import argparse

from aa_detection.config import add_overrides_argument, add_trust_config_argument, setup_cfg
from aa_detection.errors import exit_on_user_error
from aa_detection.export import FORMATS, export_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    add_trust_config_argument(p)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    p.add_argument("--sample-image", default=None, help="image to trace with (default: the first test image)")
    add_overrides_argument(p)
    args = p.parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts, trusted=args.trust_config)
    print(export_model(cfg, args.output, args.format, args.sample_image))


if __name__ == "__main__":
    with exit_on_user_error():
        main()
