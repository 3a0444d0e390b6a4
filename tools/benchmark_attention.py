#!/usr/bin/env python
"""Benchmark of the relative attention paths (naive, fused, kernel, flex) on the res5, res4 and res3 maps
of an 800x1333 input: time, peak memory, differences from the naive path, and the attention's floor at
the device's measured matmul and exp rates. See aa_detection/benchmark/attention.py.

    python tools/benchmark_attention.py [--sizes res5,res4,res3] [--paths naive,fused,kernel] [--json out.json]
    python tools/benchmark_attention.py --device cuda [--amp bf16]   # naive, fused, flex on the GPU
    python tools/benchmark_attention.py --paths kernel --kernel-isas all   # the kernel's instruction sets
    python tools/benchmark_attention.py --sweep                      # small maps, to place NAIVE_MAX_PIXELS
"""
import argparse

from aa_detection.benchmark import attention
from aa_detection.errors import exit_on_user_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = attention.add_arguments(parser).parse_args(argv)
    with exit_on_user_error():  # e.g. --device cuda without CUDA: its message and exit status 2
        return attention.main(args)


if __name__ == "__main__":
    main()
