#!/usr/bin/env python
"""Train and evaluate the baseline and the AA RetinaNet on the synthetic shapes, then compare them.

    python tools/run_synthetic.py              # one run per model, SEED 1 (the quick start)
    python tools/run_synthetic.py --seeds 3    # SEED 1, 2, 3 per model: mean, spread, per-seed values

Generates the dataset under $DETECTRON2_DATASETS/synthetic (datasets/synthetic) if it is missing, trains
each config once per seed (OUTPUT/<model>/seed<N>, each run in its own process), then prints the table
of tools/compare_runs.py and writes the loss / AP plot. Config overrides for every run go last:

    python tools/run_synthetic.py --configs A.yaml B.yaml SOLVER.MAX_ITER 100
"""
import argparse
import os
import sys

from aa_detection.config import add_overrides_argument, add_trust_config_argument, split_overrides
from aa_detection.engine.compare import format_table, load_run, plot_runs
from aa_detection.engine.runs import train_seeds
from aa_detection.errors import exit_on_user_error

TOOLS = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(TOOLS), "configs", "synthetic")
CONFIGS = [os.path.join(CONFIG_DIR, f"retinanet_{m}_FPN_synthetic.yaml") for m in ("R_18", "AA_R_18")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="config files to train")
    add_trust_config_argument(p)
    p.add_argument("--seeds", type=int, default=1, help="runs per config, with SEED 1..N")
    p.add_argument("--output", default="output/synthetic", help="parent of the runs' output folders")
    p.add_argument("--plot", default=None, help="plot path (default: OUTPUT/loss_ap.png)")
    p.add_argument("--eval-only", action="store_true", help="only compare existing runs")
    add_overrides_argument(p)
    args = p.parse_args(argv)
    args.configs, args.opts = split_overrides(args.configs, args.opts)
    return args


def main(argv=None):
    args = parse_args(argv)
    runs, failed = train_seeds(os.path.join(TOOLS, "train_net.py"), args.configs, range(1, args.seeds + 1),
                               args.output, args.opts, not args.eval_only, args.trust_config)
    runs = [load_run(run) for run in runs]
    if runs:
        print("\n" + format_table(runs))
        print("plot:", plot_runs(runs, args.plot or os.path.join(args.output, "loss_ap.png")))
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with exit_on_user_error():  # a bad config or dataset: its message and exit status 2, no traceback
        sys.exit(main())
