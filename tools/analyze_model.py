#!/usr/bin/env python
"""Parameters and FLOPs of one or more models at a fixed input size, side by side.

    python tools/analyze_model.py --config-file configs/retinanet_R_50_FPN_1x.yaml \
        configs/retinanet_AA_R_50_FPN_1x.yaml --size 800 1333 [--opts KEY VALUE ...]

FLOPs follow fvcore (one multiply-add = one flop) for one image of the given size (inference, CPU),
attention matmuls included (aa_detection.analysis.flop_count); detectron2's post-processing is not counted.
`--opts` apply to every config.
"""
import argparse
import sys

import torch

from aa_detection.analysis import count_parameters, flop_count
from aa_detection.config import setup_cfg
from aa_detection.errors import exit_on_user_error

__all__ = ["analyze", "main"]


def analyze(config_file, opts=(), size=(800, 1333), flops=True):
    """{"config", "params", "backbone_params", "gflops", "attention_gflops"} of one config's model."""
    from detectron2.modeling import build_model

    cfg = setup_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    row = {
        "config": config_file,
        "params": count_parameters(model)["total"],
        "backbone_params": count_parameters(model.backbone.bottom_up)["total"]
        if hasattr(model.backbone, "bottom_up") else count_parameters(model.backbone)["total"],
    }
    if flops:
        image = torch.rand(3, *size) * 255
        total, by_op = flop_count(model, ([{"image": image, "height": size[0], "width": size[1]}],))
        row["gflops"] = total / 1e9
        row["attention_gflops"] = by_op["attention"] / 1e9
    return row


def format_table(rows):
    header = ["config", "params (M)", "backbone params (M)", "GFLOPs", "attention matmul GFLOPs"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        cells = [r["config"], f"{r['params'] / 1e6:.2f}", f"{r['backbone_params'] / 1e6:.2f}",
                 f"{r['gflops']:.1f}" if "gflops" in r else "-",
                 f"{r['attention_gflops']:.2f}" if "attention_gflops" in r else "-"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Parameters and FLOPs of detectron2 models, side by side.")
    parser.add_argument("--config-file", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"),
                        help="input image size for the FLOP count (default 800 1333)")
    parser.add_argument("--no-flops", action="store_true", help="count parameters only")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every config")
    args = parser.parse_args(argv)
    rows = [analyze(f, args.opts, tuple(args.size), flops=not args.no_flops) for f in args.config_file]
    if not args.no_flops:
        print(f"input {args.size[0]}x{args.size[1]}, fvcore FLOPs (1 multiply-add = 1 flop)")
    print(format_table(rows))
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(f"{r['config']} / {base['config']}: params x{r['params'] / base['params']:.4f}"
                  + (f", FLOPs x{r['gflops'] / base['gflops']:.4f}" if "gflops" in r else ""))
    return rows


if __name__ == "__main__":
    with exit_on_user_error():  # a bad config: its message and exit status 2, no traceback
        main()
    sys.exit(0)
