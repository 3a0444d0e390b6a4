#!/usr/bin/env python
"""Parameters and FLOPs of one or more models at a fixed input size, side by side.

    python tools/analyze_model.py --config-file configs/retinanet_R_50_FPN_1x.yaml \
        configs/retinanet_AA_R_50_FPN_1x.yaml --size 800 1333 [KEY VALUE ...]

FLOPs follow fvcore (one multiply-add = one flop) for one image of the given size (inference, CPU),
attention matmuls included (aa_detection.analysis.flop_count); detectron2's post-processing is not counted.
The `KEY VALUE` overrides at the end apply to every config.

    python tools/analyze_model.py --config-file CFG --liveness MODEL.WEIGHTS OUT/model_final.pth

`--liveness` answers "is the attention used?" for the weights instead: over one training step on the
config's training images, each attention-augmented layer's share of attention channels alive (output
that varies, a gradient that reaches them) and the output RMS of its attention branch over its
convolution branch's, per layer and per stage.
"""
import argparse

from aa_detection.analysis import analyze_config, attention_liveness
from aa_detection.config import add_overrides_argument, add_trust_config_argument, split_overrides
from aa_detection.utils.table import format_table
from aa_detection.errors import exit_on_user_error
from aa_detection.modeling.liveness import dead_layers_message, stage_summary

HEADER = ["config", "params (M)", "backbone params (M)", "GFLOPs", "attention matmul GFLOPs"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Parameters and FLOPs of detectron2 models, side by side.")
    parser.add_argument("--config-file", nargs="+", required=True, metavar="FILE")
    add_trust_config_argument(parser)
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"),
                        help="input image size for the FLOP count (default 800 1333)")
    parser.add_argument("--no-flops", action="store_true", help="count parameters only")
    parser.add_argument("--liveness", action="store_true",
                        help="report the attention channels' liveness of the config's MODEL.WEIGHTS instead")
    parser.add_argument("--images", type=int, default=4, help="training images of the --liveness step")
    add_overrides_argument(parser)
    args = parser.parse_args(argv)
    args.config_file, args.opts = split_overrides(args.config_file, args.opts)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.liveness:
        return [print_liveness(f, attention_liveness(f, args.opts, args.images, args.trust_config))
                for f in args.config_file]
    rows = [analyze_config(f, args.opts, tuple(args.size), flops=not args.no_flops, trusted=args.trust_config)
            for f in args.config_file]
    if not args.no_flops:
        print(f"input {args.size[0]}x{args.size[1]}, fvcore FLOPs (1 multiply-add = 1 flop)")
    print(format_table(HEADER, [[r["config"], f"{r['params'] / 1e6:.2f}", f"{r['backbone_params'] / 1e6:.2f}",
                                 f"{r['gflops']:.1f}" if "gflops" in r else "-",
                                 f"{r['attention_gflops']:.2f}" if "gflops" in r else "-"] for r in rows]))
    for r in rows[1:]:
        print(f"{r['config']} / {rows[0]['config']}: params x{r['params'] / rows[0]['params']:.4f}"
              + (f", FLOPs x{r['gflops'] / rows[0]['gflops']:.4f}" if "gflops" in r else ""))
    return rows


def print_liveness(config_file, report):
    print(config_file)
    print(format_table(["layer", "attention channels alive", "attention / conv output RMS"],
                       [[name, f"{r.alive} / {r.channels}", f"{r.attention_to_conv:.3f}"] for name, r in report.items()]))
    print(format_table(["stage", "alive", "attention / conv output RMS"],
                       [[stage, f"{v['alive']:.0%}", f"{v['attention_to_conv']:.3f}"]
                        for stage, v in stage_summary(report).items()]))
    print(dead_layers_message(report) or "every attention channel is alive")
    return report


if __name__ == "__main__":
    with exit_on_user_error():  # a bad config: its message and exit status 2, no traceback
        main()
