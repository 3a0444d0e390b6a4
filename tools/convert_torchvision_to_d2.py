#!/usr/bin/env python
"""Convert a torchvision ResNet state dict to a detectron2-format .pkl.

    python tools/convert_torchvision_to_d2.py resnet50.pth R-50-torchvision.pkl

detectron2's tools/convert-torchvision-to-d2.py renames the same way, but a pip install of detectron2
does not ship it and it cannot be imported; this one can (tests use `convert`), and it also unwraps a
checkpoint holding the state dict under "state_dict" or "model".

Names map to detectron2's ResNet (stem, res2..res5); the classifier `fc` is dropped. The output is
{"model": {name: ndarray}, "__author__": "torchvision", "matching_heuristics": True}, so detectron2 and
aa_detection.checkpoint.AACheckpointer match it to backbone keys by suffix. Models using it need RGB input,
MODEL.PIXEL_MEAN [123.675, 116.280, 103.530], MODEL.PIXEL_STD [58.395, 57.120, 57.375] and
MODEL.RESNETS.STRIDE_IN_1X1 False.
"""
import argparse
import pickle
import re

import torch


def _rename(key):
    """One torchvision key -> its detectron2 name, or None for keys detectron2's ResNet has no use for."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    key = re.sub(r"^conv1\.", "stem.conv1.", key)
    key = re.sub(r"^bn1\.", "stem.conv1.norm.", key)
    key = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"\.bn([1-3])\.", r".conv\1.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key


def convert_torchvision_names(state_dict):
    """torchvision ResNet state dict -> {detectron2 name: tensor} (fc and BN counters dropped)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key)
        if new is not None:
            out[new] = value
    return out


def convert(input_path, output_path):
    state = torch.load(input_path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    converted = {k: v.detach().cpu().numpy() for k, v in convert_torchvision_names(state).items()}
    with open(output_path, "wb") as f:
        pickle.dump({"model": converted, "__author__": "torchvision", "matching_heuristics": True}, f)
    return converted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("input", help="torchvision ResNet state dict (.pth)")
    parser.add_argument("output", help="detectron2-format .pkl to write")
    args = parser.parse_args(argv)
    converted = convert(args.input, args.output)
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
