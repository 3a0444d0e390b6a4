#!/usr/bin/env python
"""Train and evaluate the baseline and the AA RetinaNet on the synthetic shapes, then compare them.

    python tools/run_synthetic.py

Generates the dataset under $DETECTRON2_DATASETS/synthetic (datasets/synthetic) if it is missing,
trains each config with tools/train_net.py (one after the other, each in its own process), then prints
the side-by-side table of tools/compare_runs.py and writes the loss / AP plot.
"""
import argparse
import os
import subprocess
import sys
import time

from aa_detection.config import setup_cfg
from aa_detection.engine.compare import format_table, load_run, plot_runs
from aa_detection.errors import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = (
    os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml"),
    os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml"),
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="config files to train")
    p.add_argument("--output", default="output/synthetic", help="parent of the runs' output folders")
    p.add_argument("--plot", default=None, help="plot path (default: OUTPUT/loss_ap.png)")
    p.add_argument("--eval-only", action="store_true", help="only compare existing runs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = p.parse_args(argv)

    run_dirs, failed = [], []
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0].replace("_synthetic", "")
        out = os.path.join(args.output, name)
        opts = list(args.opts) + ["OUTPUT_DIR", out]
        setup_cfg(config, opts, prepare_data=True)  # fails early on a bad config; generates, checks the data
        if not args.eval_only:
            cmd = [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", config] + opts
            print(">>", " ".join(cmd), flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
            print(f">> {name}: exit code {rc} after {time.perf_counter() - start:.0f} s", flush=True)
            if rc != 0:
                failed.append(name)
                continue
        run_dirs.append((out, name))

    runs = [load_run(d, n) for d, n in run_dirs if os.path.isdir(d)]
    if runs:
        print()
        print(format_table(runs))
        plot = args.plot or os.path.join(args.output, "loss_ap.png")
        print("plot:", plot_runs(runs, plot))
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with exit_on_user_error():  # a bad config or dataset: its message and exit status 2, no traceback
        sys.exit(main())
