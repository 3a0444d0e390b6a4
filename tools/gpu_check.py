#!/usr/bin/env python
"""The GPU check in one command, for a GPU machine without a package registry: installs what is missing
(wheels, detectron2 from its source archive, the project), then runs the CUDA tests, the attention and
model benchmarks and a short training, each step in its own process with a deadline, its results written
to --output as soon as it has them. See aa_detection/benchmark/gpu_check.py and docs/PERFORMANCE.md.

    bash tools/prepare_gpu_check.sh      # here, with a package registry: .whl/ and .d2/ to carry
    python tools/gpu_check.py --wheels .whl --detectron2-archive .d2/detectron2-<commit>.tar.gz --output gpu_check/
    python tools/gpu_check.py --dry-run --output /tmp/gpu_check   # every step on the CPU at tiny sizes
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # before the project is installed

from aa_detection.benchmark import gpu_check  # noqa: E402

if __name__ == "__main__":
    sys.exit(gpu_check.main())
