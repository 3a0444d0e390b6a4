#!/usr/bin/env python
"""Regenerate BENCHMARKS.md: the attention benchmark and the model benchmarks, with the targets checked.

Runs, each in its own process (so one's memory peak cannot bleed into the next), on --device:

1. the attention benchmark (tools/benchmark_attention.py) on the res5, res4 and res3 maps of an
   800x1333 input (batch 2, Nh=8);
2. the model benchmark (tools/benchmark.py --profile) of the R-50 RetinaNet baseline against its AA twin
   with attention in res4 and res5;
3. the same with attention in res3, res4 and res5 (the default AA config), with the per-stage costs;

keeps their raw results as JSON in the results folder (docs/benchmarks/ for the default --out), then
renders BENCHMARKS.md from every result in that folder (CPU and GPU runs alike). See
aa_detection/benchmark/report.py.

    python tools/make_benchmarks.py                      # about 15 minutes on a quiet 2-core CPU
    python tools/make_benchmarks.py --reuse              # re-render from docs/benchmarks/ (measures only what is missing)
    python tools/make_benchmarks.py --device cuda --reuse   # add the GPU runs, keep the CPU ones
    python tools/make_benchmarks.py --repeats 1 --size 400 667 --out /tmp/B.md   # a quick smoke run
"""
import argparse
import os

from aa_detection.benchmark import report
from aa_detection.errors import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(parser).set_defaults(out=os.path.join(ROOT, "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    with exit_on_user_error():  # e.g. --device cuda without CUDA: its message and exit status 2
        report.main(args, os.path.join(ROOT, "BENCHMARKS.md"), os.path.join(ROOT, "docs", "benchmarks"))


if __name__ == "__main__":
    main()
