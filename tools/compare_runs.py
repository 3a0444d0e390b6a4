#!/usr/bin/env python
"""Compare training runs side by side and plot their loss and AP curves.

    python tools/compare_runs.py output/synthetic/retinanet_R_18_FPN output/synthetic/retinanet_AA_R_18_FPN \
        --plot output/synthetic/loss_ap.png
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aa_detection.engine.compare import format_table, load_run, plot_runs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="detectron2 output folders")
    p.add_argument("--names", nargs="+", help="column names (default: the folder names)")
    p.add_argument("--plot", metavar="PNG", help="write the loss / AP plot here")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error("--names needs one name per run")
    names = args.names or [None] * len(args.runs)
    runs = [load_run(d, n) for d, n in zip(args.runs, names)]
    print(format_table(runs))
    if args.plot:
        print("plot:", plot_runs(runs, args.plot))
    return runs


if __name__ == "__main__":
    main()
