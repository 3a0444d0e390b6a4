#!/usr/bin/env python
"""Run a trained detector on images, a video or a webcam and draw its detections (detectron2's flags).

    python tools/demo.py --config-file CFG --input img1.jpg 'photos/*.jpg' folder/ --output out/ \
        MODEL.WEIGHTS output/model_final.pth
    python tools/demo.py --config-file CFG --video-input clip.mp4 --output clip_detections.mp4 MODEL.WEIGHTS W
    python tools/demo.py --config-file CFG --webcam --output webcam.mp4 --max-frames 300 MODEL.WEIGHTS W
"""
import argparse

from aa_detection.config import add_overrides_argument, add_trust_config_argument, setup_cfg, split_overrides
from aa_detection.demo import Demo
from aa_detection.errors import UsageError, exit_on_user_error
from aa_detection.visualization.predictions import expand_inputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    add_trust_config_argument(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first camera")
    p.add_argument("--output", help="a file or folder for the pictures, the output video for videos")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="lowest score drawn")
    p.add_argument("--max-frames", type=int, default=None, help="stop a video or the webcam after this many frames")
    add_overrides_argument(p)
    args = p.parse_args(argv)
    args.input, args.opts = split_overrides(args.input or [], args.opts)
    return args


def main(argv=None):
    args = parse_args(argv)
    if (args.video_input or args.webcam) and not args.output:
        raise UsageError("--video-input and --webcam need --output (the video to write)")
    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.RETINANET.SCORE_THRESH_TEST", str(args.confidence_threshold)],
                    trusted=args.trust_config)
    demo = Demo(cfg, args.confidence_threshold)
    if args.input:
        for path, count in demo.write_images(expand_inputs(args.input), args.output):
            print(f"{path}: {count} detections")
    else:
        frames = demo.write_video(0 if args.webcam else args.video_input, args.output, args.max_frames)
        print(f"{args.output}: {frames} frames")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
