#!/usr/bin/env python
"""Cost of the AA detection model against its baseline, side by side in one process: inference and
training step time, peak memory, parameters, GFLOPs, each augmented stage alone and (--profile) where
the extra time goes. See aa_detection/benchmark/model.py.

    python tools/benchmark.py
    python tools/benchmark.py --size 640 640 MODEL.AA.STAGES "['res4','res5']"
    python tools/benchmark.py --device cuda [--amp bf16]
"""
import argparse

from aa_detection.benchmark import model
from aa_detection.errors import exit_on_user_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = model.add_arguments(parser).parse_args(argv)
    with exit_on_user_error():  # a bad config or --device cuda without CUDA: its message and exit status 2
        return model.main(args)


if __name__ == "__main__":
    main()
