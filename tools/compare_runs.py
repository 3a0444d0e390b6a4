#!/usr/bin/env python
"""Compare training runs side by side and plot their loss and AP curves.

    python tools/compare_runs.py output/synthetic/retinanet_R_18_FPN output/synthetic/retinanet_AA_R_18_FPN \
        --plot output/synthetic/loss_ap.png
"""
import argparse

from aa_detection.engine.compare import format_table, load_run, plot_runs
from aa_detection.errors import UsageError, exit_on_user_error


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="detectron2 output folders")
    p.add_argument("--names", nargs="+", help="column names (default: the folder names)")
    p.add_argument("--plot", metavar="PNG", help="write the loss / AP plot here")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error("--names needs one name per run")
    names = args.names or [None] * len(args.runs)
    try:
        runs = [load_run(d, n) for d, n in zip(args.runs, names)]
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    print(format_table(runs))
    if args.plot:
        print("plot:", plot_runs(runs, args.plot))
    return runs


if __name__ == "__main__":
    with exit_on_user_error():  # a folder that is not a run: its message and exit status 2
        main()
