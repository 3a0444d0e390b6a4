#!/usr/bin/env python
"""Detections, attention maps and baseline-vs-AA comparisons as images.

    python tools/visualize.py predict --config-file CFG --weights W --input img.jpg folder/ --output OUT
    python tools/visualize.py predict --config-file CFG --weights W --dataset synthetic_val --output OUT
    python tools/visualize.py results --results OUT/inference/synthetic_val/coco_instances_results.json \
        --dataset synthetic_val --config-file CFG --output OUT
    python tools/visualize.py attention --config-file CFG --weights W --input img.jpg --query 80 60 --output OUT
    python tools/visualize.py compare --config-file BASE_CFG AA_CFG --weights BASE_W AA_W --input img.jpg --output OUT

Config overrides, KEY VALUE pairs, go at the end of the command. See `python tools/visualize.py COMMAND -h`.
"""
import sys

from aa_detection.errors import exit_on_user_error
from aa_detection.visualization.cli import main

if __name__ == "__main__":
    with exit_on_user_error():  # a bad config, dataset, weights file or argument: its message, exit 2
        sys.exit(main())
