"""Pretrained ResNet / AA-ResNet classifiers as detectron2 weights for the (AA) RetinaNet backbone.

`convert_pretrained(src, dst, cfg=...)` reads one of

- a classifier checkpoint of `aa_detection.pretraining.train` (last.pth / best.pth): its EMA weights when it
  has them, else its model weights; names are already detectron2's (the classifier is the backbone);
- a torchvision or timm ResNet state dict (.pth/.pt, or .safetensors): `conv1`, `bn1`, `layerN.*`,
  `downsample.*` renamed to detectron2's `stem.conv1`, `resN+1.*`, `shortcut.*`; depth, widths and
  groups read from the shapes (ResNet-18 to -152, ResNeXt); deep-stem variants are refused;
- a Caffe2 ResNet `.pkl` such as detectron2's MSRA ImageNet weights
  (`detectron2://ImageNetPretrained/MSRA/R-50.pkl`, any path detectron2's PathManager opens), read with
  the restricted unpickler and renamed with detectron2's `convert_basic_c2_names`; its norms are folded
  scale and bias (running mean 0, variance 1 are written), its stride is in the 1x1 convolutions and its
  input BGR, mean-subtracted with std 1;

drops the classifier head and writes `dst` (.pth): {"model": {"backbone.bottom_up." + name: tensor},
"__author__": ..., "matching_heuristics": False, "aa_detection": metadata} where the metadata holds the
architecture (the `aa_resnet` arguments and each attention layer's heads, dk, dv, relative, downsampling),
the input format ("RGB"; "BGR" for Caffe2 weights) and the pixel mean/std (0-255, in that channel
order) the weights were trained with; the same metadata goes to `dst` with a .json suffix.

Relative tables are resized at conversion (exactly, under the clipping rule, with
`resize_relative_table`) to the rows of the target backbone: the one `cfg` builds (the config's
longest padded image side), or without a config the one `max_input_size` gives; the checkpointer
resizes them the same way when a config asks for other image sizes later. A config whose
backbone differs (depth, widths, stride placement, attention stages, heads, dk/dv) is refused with the
differences named. `check_weights_format(cfg, path)` makes the same checks, plus MODEL.PIXEL_MEAN,
MODEL.PIXEL_STD and INPUT.FORMAT, for a converted file before it is loaded.

Entries wider than the target's AA layers are fitted to them (`aa_detection.checkpoint.fit_aa_layers`):
weights without attention (torchvision, timm, d2_resnet*) give each augmented convolution the first
Fout - dv filters and norm channels and leave the attention at its initialisation; an AA classifier's
norm over the concatenation is split between the convolution's frozen norm and the attention's own.
"""
import json
import os
import re
from typing import Iterable, List, Optional

from detectron2.config import CfgNode
from detectron2.utils.file_io import PathManager
import torch
from torch import nn

from ..checkpoint import fit_aa_layers, is_attention_parameter
from ..errors import ConfigError, UsageError, WeightsError
from ..layers import AAConv2d, AttentionSpec
from ..layers.relative_logits import resize_relative_table
from ..modeling.backbone import RESNET_BLOCKS, STAGE_NAMES, aa_resnet
from ..safe_io import atomic_write, load_pickle_weights, load_torch_weights

__all__ = ["convert_pretrained", "check_weights_format", "describe_resnet", "architecture_differences",
           "torchvision_to_d2_names", "IMAGENET_PIXEL_MEAN", "IMAGENET_PIXEL_STD", "MSRA_PIXEL_MEAN",
           "METADATA_KEY"]

METADATA_KEY = "aa_detection"
# The metadata fields check_weights_format reads (convert_pretrained writes them, and more).
CHECKED_METADATA_FIELDS = ("pixel_mean", "pixel_std", "input_format", "description")
# torchvision's and timm's ResNet normalisation (ImageNet mean/std of RGB images) in 0-255 units.
IMAGENET_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD = [58.395, 57.12, 57.375]
# detectron2's MSRA weights: BGR images, this mean (BGR order), std 1.
MSRA_PIXEL_MEAN = [103.530, 116.280, 123.675]
_BLOCKS_TO_DEPTH = {(blocks, depth >= 50): depth for depth, blocks in RESNET_BLOCKS.items()}


# ---- describing architectures ------------------------------------------------------------------------
def describe_resnet(resnet: nn.Module) -> dict:
    """What decides whether weights fit a detectron2-named (AA-)ResNet: depth, widths (stem, res2 output,
    res2 bottleneck, groups), where the stride is (stride_in_1x1, bottlenecks only) and each AAConv2d's
    {num_heads, dk, dv, relative, downsample}."""
    stages = [getattr(resnet, name) for name in STAGE_NAMES]
    first = stages[0][0]
    bottleneck = hasattr(first, "conv3")
    conv2 = first.conv2
    groups = getattr(conv2, "groups", 1)
    attention = {
        name: {"num_heads": m.num_heads, "dk": m.key_depth, "dv": m.value_depth, "relative": m.relative,
               "downsample": m.attention_downsample}
        for name, m in resnet.named_modules() if isinstance(m, AAConv2d)
    }
    return {
        "depth": _BLOCKS_TO_DEPTH.get((tuple(len(s) for s in stages), bottleneck)),
        "widths": [resnet.stem.out_channels, first.out_channels, first.conv1.out_channels, groups],
        "stride_in_1x1": tuple(stages[1][0].conv1.stride) == (2, 2) if bottleneck else None,
        "attention": attention,
    }


def architecture_differences(weights: dict, model: dict) -> list:
    """Human-readable differences between two `describe_resnet` results (weights first). Weights without
    attention fit any attention layout (the checkpointer slices the convolutions)."""
    diffs = []
    if weights["depth"] != model["depth"]:
        diffs.append(f"depth: weights ResNet-{weights['depth']}, model ResNet-{model['depth']} (MODEL.RESNETS.DEPTH)")
    if list(weights["widths"]) != list(model["widths"]):
        diffs.append(f"widths [stem, res2 output, res2 bottleneck, groups]: weights {weights['widths']}, model "
                     f"{model['widths']} (MODEL.RESNETS.STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, WIDTH_PER_GROUP, "
                     "NUM_GROUPS)")
    if weights["stride_in_1x1"] != model["stride_in_1x1"]:
        diffs.append(f"stride_in_1x1: weights {weights['stride_in_1x1']}, model {model['stride_in_1x1']} "
                     "(MODEL.RESNETS.STRIDE_IN_1X1)")
    if not weights["attention"] or diffs:
        return diffs

    def stages(layers: Iterable[str]) -> List[str]:
        return sorted({name.split(".")[0] for name in layers})

    if stages(weights["attention"]) != stages(model["attention"]):
        diffs.append(f"attention stages: weights {stages(weights['attention'])}, model "
                     f"{stages(model['attention'])} (MODEL.AA.STAGES)")
    layers = [n for n in weights["attention"] if n in model["attention"]
              and weights["attention"][n] != model["attention"][n]]
    if layers:
        w, m = weights["attention"][layers[0]], model["attention"][layers[0]]
        diffs.append(f"{layers[0]} (and {len(layers) - 1} more attention layers): weights {_fmt(w)}; model {_fmt(m)} "
                     "(MODEL.AA.NUM_HEADS, KAPPA, UPSILON, RELATIVE, DOWNSAMPLE_STAGES)")
    return diffs


def _fmt(layer):
    return ", ".join(f"{k}={v}" for k, v in layer.items())


# ---- reading sources ---------------------------------------------------------------------------------
def torchvision_to_d2_names(state: dict) -> dict:
    """torchvision / timm ResNet state dict -> {detectron2 name: tensor}; the classifier `fc` is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        new = re.sub(r"^conv1\.", "stem.conv1.", key)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.bn([1-3])\.", r".conv\1.norm.", new)
        out[new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")] = value
    return out


def _plain_architecture(state: dict, path: str) -> dict:
    """aa_resnet arguments of a plain detectron2-named ResNet state dict, from its shapes."""
    if "stem.conv1.weight" not in state or state["stem.conv1.weight"].dim() != 4:
        raise WeightsError(f"{path}: not a torchvision/timm-style ResNet (no single 7x7 stem convolution `conv1`; "
                         "deep-stem variants such as resnet50d are not supported)")
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"{s}.")}) for s in STAGE_NAMES)
    bottleneck = "res2.0.conv3.weight" in state
    depth = _BLOCKS_TO_DEPTH.get((blocks, bottleneck))
    if depth is None:
        raise WeightsError(f"{path}: blocks per stage {blocks} ({'bottleneck' if bottleneck else 'basic'}) are no "
                         f"ResNet depth of {sorted(RESNET_BLOCKS)}")
    width, spec = state["res2.0.conv1.weight"].shape[0], AttentionSpec()
    groups = width // state["res2.0.conv2.weight"].shape[1]
    return dict(depth=depth, stem_out_channels=state["stem.conv1.weight"].shape[0],
                res2_out_channels=state[f"res2.0.conv{3 if bottleneck else 2}.weight"].shape[0],
                width_per_group=width // groups, num_groups=groups, stride_in_1x1=False, aa_stages=[],
                num_heads=spec.num_heads, kappa=spec.kappa, upsilon=spec.upsilon, relative=spec.relative,
                downsample_stages=[])


def _load(path):
    if path.endswith(".pkl"):
        return load_pickle_weights(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return load_torch_weights(path)


def read_pretrained(path: str, weights: str = "auto") -> dict:
    """{"state": backbone state dict (detectron2 names, no head), "architecture": aa_resnet arguments,
    "pixel_mean", "pixel_std" (0-255, in the input's channel order), "source", and "input_format" when it
    is not "RGB"} of a classifier checkpoint, a torchvision/timm ResNet or a Caffe2 ResNet pickle; `path`
    is anything detectron2's PathManager opens (detectron2://..., a URL, a file). weights: "auto" (a
    classifier's EMA when it has one), "ema" or "model"."""
    data = _load(PathManager.get_local_path(path))
    if isinstance(data, dict) and "architecture" in data and "model" in data:  # aa_detection.pretraining.train
        if weights == "auto":
            weights = "ema" if data.get("ema") is not None else "model"
        if data.get(weights) is None:
            raise WeightsError(f"{path}: the checkpoint has no {weights!r} weights")
        config = data["data_config"]
        return {"state": {k: v for k, v in data[weights].items() if not k.startswith(("linear.", "avgpool."))},
                "architecture": data["architecture"], "pixel_mean": [round(255.0 * m, 4) for m in config["mean"]],
                "pixel_std": [round(255.0 * s, 4) for s in config["std"]], "source": f"{data['model_name']} {weights} weights"}
    if path.endswith(".pkl"):
        return _read_caffe2(data, path)
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not any(k.startswith("layer1.") for k in data):
        raise WeightsError(f"{path}: neither an aa_detection.pretraining.train checkpoint nor a torchvision/timm ResNet "
                         "state dict (no `layer1.*` keys)")
    state = torchvision_to_d2_names(data)
    return {"state": state, "architecture": _plain_architecture(state, path), "pixel_mean": IMAGENET_PIXEL_MEAN,
            "pixel_std": IMAGENET_PIXEL_STD, "source": "torchvision/timm ResNet"}


def _read_caffe2(data, path: str) -> dict:
    """read_pretrained's result for a Caffe2 ResNet pickle ({"blobs": {name: array}} or {name: array})."""
    from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict) or "conv1_w" not in blobs:
        raise WeightsError(f"{path}: not a Caffe2 ResNet pickle such as detectron2's MSRA ImageNet weights "
                           "(no `conv1_w` blob)")
    names = list(blobs)
    state = {new: torch.as_tensor(blobs[old]).float() for old, new in zip(names, convert_basic_c2_names(names))
             if re.match(r"(stem|res[2-5])\.", new) and not old.endswith("_momentum")}  # no classifier
    for key in [k for k in state if k.endswith(".norm.weight")]:
        stem = key[:-len("weight")]
        state.setdefault(stem + "running_mean", torch.zeros_like(state[key]))
        state.setdefault(stem + "running_var", torch.ones_like(state[key]))
    architecture = dict(_plain_architecture(state, path), stride_in_1x1=True)
    return {"state": state, "architecture": architecture, "pixel_mean": MSRA_PIXEL_MEAN,
            "pixel_std": [1.0, 1.0, 1.0], "input_format": "BGR", "source": "Caffe2 (MSRA) ResNet"}


# ---- targets -----------------------------------------------------------------------------------------
def _config_backbone(cfg):
    """(detectron2 ResNet the config builds, on the meta device; its key prefix in the detector)."""
    from detectron2.modeling import build_backbone

    import aa_detection.modeling  # noqa: F401  (registers the AA backbones)

    with torch.device("meta"):
        backbone = build_backbone(cfg)
    if hasattr(backbone, "bottom_up"):
        return backbone.bottom_up, "backbone.bottom_up."
    return backbone, "backbone."


def _architecture_backbone(architecture: dict, max_input_size: int):
    with torch.device("meta"):
        return aa_resnet(**architecture, norm="FrozenBN", max_input_size=max_input_size)


def _check_fits(describe_weights: dict, resnet: nn.Module, where: str):
    diffs = architecture_differences(describe_weights, describe_resnet(resnet))
    if diffs:
        raise ConfigError(f"the pretrained weights do not fit the backbone {where} builds: " + "; ".join(diffs))


def convert_pretrained(src: str, dst: str, cfg: Optional[CfgNode] = None, max_input_size: int = 1344,
                       weights: str = "auto") -> dict:
    """Write `src` as detectron2 weights `dst` (.pth) and `dst` .json metadata; returns the metadata.

    Relative tables get the rows of the backbone `cfg` builds, or without `cfg` those of longest image
    side `max_input_size` (1344: COCO's 1333 padded to 32). Keys get the config backbone's prefix
    ("backbone.bottom_up." for FPN backbones), without `cfg` "backbone.bottom_up.". ConfigError when the
    config's backbone differs from the weights'."""
    if not dst.endswith(".pth"):
        raise UsageError(f"{dst}: the converted file is a torch file, name it *.pth")
    source = read_pretrained(src, weights)
    source_resnet = _architecture_backbone(source["architecture"], max_input_size)
    described = describe_resnet(source_resnet)
    if cfg is not None:
        target, prefix = _config_backbone(cfg)
        _check_fits(described, target, "the config")
    else:
        target, prefix = source_resnet, "backbone.bottom_up."
    target_state = target.state_dict()
    state = {}
    for key, value in source["state"].items():
        if key.endswith(("rel_h", "rel_w")) and key in target_state:
            value = resize_relative_table(value, target_state[key].shape[0])
        if key.endswith("num_batches_tracked") and key not in target_state:
            continue  # FrozenBN targets have no counters
        state[key] = value.detach().clone().contiguous()
    fit_aa_layers(state, target)  # full-width kernels and norms to the AA layers' branches
    missing = [k for k in target_state if k not in state and not k.endswith("num_batches_tracked")
               and not (not described["attention"] and is_attention_parameter(k))]
    unexpected = [k for k in state if k not in target_state]
    if missing or unexpected:
        raise WeightsError(f"{src}: the weights do not cover the backbone: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} entries)")
    metadata = {
        "source": source["source"], "architecture": source["architecture"], "description": described,
        "pixel_mean": source["pixel_mean"], "pixel_std": source["pixel_std"],
        "input_format": source.get("input_format", "RGB"),
        "relative_rows": {k: target_state[k].shape[0] for k in state if k.endswith("rel_h")},
    }
    with atomic_write(dst, "wb") as f:
        torch.save({"model": {prefix + k: v for k, v in state.items()}, "__author__": f"aa_detection ({src})",
                    "matching_heuristics": False, METADATA_KEY: metadata}, f)
    with atomic_write(os.path.splitext(dst)[0] + ".json", "w") as f:
        json.dump(metadata, f, indent=1)
    return metadata


def check_weights_format(cfg: CfgNode, path: str) -> None:
    """ConfigError naming both values when a converted file (convert_pretrained) does not fit `cfg`:
    MODEL.PIXEL_MEAN, MODEL.PIXEL_STD or INPUT.FORMAT other than the weights', a backbone of another
    architecture. It reads the metadata .json the converter writes beside the weights (the weights
    themselves are not loaded); files without one (checkpoints of training runs, other weights) or with
    a .json of something else beside them are not checked; an unreadable .json is a WeightsError."""
    sidecar = os.path.splitext(path)[0] + ".json"
    if not path.endswith(".pth") or not os.path.isfile(sidecar):
        return
    try:
        with open(sidecar) as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{sidecar}: the metadata beside {path} cannot be read ({e})") from e
    if not isinstance(metadata, dict) or not set(CHECKED_METADATA_FIELDS) <= set(metadata):
        return  # not the converter's
    problems = []
    for key, value in (("MODEL.PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN), ("MODEL.PIXEL_STD", cfg.MODEL.PIXEL_STD)):
        expected = metadata[key.split(".")[1].lower()]
        if len(value) != len(expected) or any(abs(a - b) > 1e-3 for a, b in zip(value, expected)):
            problems.append(f"{key} is {list(value)}, the weights need {expected}")
    if cfg.INPUT.FORMAT != metadata["input_format"]:
        problems.append(f"INPUT.FORMAT is {cfg.INPUT.FORMAT!r}, the weights need {metadata['input_format']!r}")
    target, _ = _config_backbone(cfg)
    problems += architecture_differences(metadata["description"], describe_resnet(target))
    if problems:
        raise ConfigError(f"{path} does not fit the config: " + "; ".join(problems))
