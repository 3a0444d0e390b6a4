"""The project's config keys and the one setup every tool and test builds its config with."""
import difflib
import os
import re

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
import torch
import yaml

import aa_detection.modeling  # noqa: F401  (registers the AA backbones)

from .data.validation import BAD_IMAGE_POLICIES, IMAGE_CHECKS
from .errors import ConfigError

__all__ = ["ConfigError", "add_aa_config", "setup_cfg", "validate_aa_config", "aa_stage_widths",
           "BAD_IMAGE_POLICIES", "AA_BACKBONES"]

# Backbones built from MODEL.AA; their settings are checked against the layer before training.
AA_BACKBONES = ("build_aa_resnet_backbone", "build_retinanet_aa_resnet_fpn_backbone")


def add_aa_config(cfg):
    """Add the MODEL.AA node (attention augmentation of the ResNet backbone) to a detectron2 config."""
    cfg.MODEL.AA = CN()
    # Stages whose 3x3 convolutions are attention-augmented. The paper augments from the last
    # (smallest) stage down until memory runs out; res3-res5 is that rule made explicit.
    cfg.MODEL.AA.STAGES = ["res3", "res4", "res5"]
    cfg.MODEL.AA.NUM_HEADS = 8
    cfg.MODEL.AA.KAPPA = 0.2  # dk / Fout
    cfg.MODEL.AA.UPSILON = 0.1  # dv / Fout
    cfg.MODEL.AA.RELATIVE = True  # 2D relative position logits
    cfg.MODEL.AA.IMPL = "auto"  # attention implementation: "auto", "naive", "fused", "kernel" or "flex"
    # Stages whose attention runs on its input average-pooled 2x2 (stride 2), the output upsampled
    # bilinearly before the concatenation: the paper's way of affording the largest maps.
    cfg.MODEL.AA.DOWNSAMPLE_STAGES = ["res3"]
    # The norm after the augmented convolutions ("BN", "SyncBN", "GN", ...); "" keeps the block's own
    # (MODEL.RESNETS.NORM), e.g. FrozenBN with ImageNet weights, which the paper's trained BN is not.
    cfg.MODEL.AA.NORM = ""
    # Start the attention output projections at zero: at step 0 the attention channels are zero.
    cfg.MODEL.AA.ZERO_INIT = False
    # Each augmented stage sizes its relative tables from the longest padded image side the config can
    # produce (max(INPUT.MAX_SIZE_TRAIN, INPUT.MAX_SIZE_TEST) rounded up to the FPN's size divisibility):
    # that side / stride rows per side (res3 stride 8, res4 16, res5 32; twice that when downsampled).

    # COCO-format datasets registered at setup: a list of [name, json_file, image_root].
    cfg.DATASETS.REGISTER = []
    # The generated shapes dataset behind the names "synthetic_train" and "synthetic_val".
    cfg.DATASETS.SYNTHETIC = CN()
    cfg.DATASETS.SYNTHETIC.ROOT = ""  # "" means $DETECTRON2_DATASETS/synthetic (datasets/synthetic)
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN = 800
    cfg.DATASETS.SYNTHETIC.NUM_VAL = 200
    cfg.DATASETS.SYNTHETIC.SEED = 0

    # What a COCO-format dataset does with an image that is missing, unreadable, not an image, truncated
    # or of another size than its JSON entry: "error" stops before training, naming the image id and
    # file; "skip" leaves it out with a warning and logs the count when the dataset is loaded.
    cfg.DATASETS.BAD_IMAGES = "error"
    # How images are checked when a dataset is loaded: "decode" reads every image whole (finds truncated
    # files), "header" reads only each file's header (format and size; faster on large datasets).
    cfg.DATASETS.CHECK_IMAGES = "decode"

    # Pickle weight files (.pkl) may hold only tensors, arrays and plain containers; True loads any
    # object (which can run code): set it only for files whose source you trust.
    cfg.MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE = False

    # "SGD" (detectron2's default optimizer) or "ADAMW" (trains small models from scratch faster).
    cfg.SOLVER.OPTIMIZER = "SGD"
    return cfg


def _read_yaml(path, referrer=None):
    """The mapping in one YAML config file, read with safe loading; ConfigError naming the file."""
    if not os.path.isfile(path):
        where = f" (the _BASE_ of {referrer})" if referrer else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(
            f"{path}: refusing an unsafe YAML tag ({e.problem.strip() if e.problem else e}): configs are read "
            "with safe loading, which allows plain values, lists and mappings only (no !!python tags)") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except OSError as e:
        raise ConfigError(f"config file cannot be read: {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got a {type(data).__name__}")
    return data


def _config_chain(path, referrer=None, seen=()):
    """[(file, mapping)] of `path` and its _BASE_ files, bases first."""
    path = os.path.abspath(os.path.expanduser(path))
    if path in seen:
        raise ConfigError(f"{referrer}: _BASE_ cycle through {path}")
    data = _read_yaml(path, referrer)
    bases = data.get("_BASE_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    chain = []
    for base in bases:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        chain += _config_chain(base, path, seen + (path,))
    return chain + [(path, data)]


def _defines(mapping, key):
    node = mapping
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _node_and_leaf(cfg, key):
    """(the config node holding `key`'s last part or None, its current value or None)."""
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node, CN) or part not in node:
            return None, None
        node = node[part]
    if not isinstance(node, CN):
        return None, None
    return node, node.get(parts[-1])


def _explain_merge_error(cfg, e, where):
    """A ConfigError for a KeyError/ValueError of yacs' merge, naming the key, `where` and what is allowed."""
    text = str(e.args[0]) if e.args else str(e)
    found = re.search(r"(?:config key|key): ([\w.]+)", text)
    key = found.group(1) if found else None
    unknown = isinstance(e, KeyError) or "Non-existent" in text
    where_text = where(key, unknown) if callable(where) else where
    if unknown and key:
        parent, leaf = key.rpartition(".")[0], key.rpartition(".")[2]
        node, _ = _node_and_leaf(cfg, key)
        if node is None:
            allowed = f"'{parent}' is not a config node either" if parent else ""
        else:
            keys = sorted(node.keys())
            close = difflib.get_close_matches(leaf, keys, n=3)
            allowed = (f"did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}? " if close
                       else "") + f"keys allowed under {parent or 'the root'}: {keys}"
        return ConfigError(f"{where_text}: unknown config key {key}; {allowed}".rstrip("; "))
    if "Type mismatch" in text and key:
        _, default = _node_and_leaf(cfg, key)
        return ConfigError(f"{where_text}: {key} must be of type {type(default).__name__} like its default "
                           f"{default!r} ({text})")
    return ConfigError(f"{where_text}: {text}")


def _merge_file(cfg, config_file):
    chain = _config_chain(config_file)  # checks every file exists and is safe YAML first

    def where(key, unknown):
        files = [f for f, data in chain if key and _defines(data, key)] or [f for f, _ in chain]
        # an unknown key is wrong wherever it is set; a wrong value is the one that wins: the last file's
        return ", ".join(files if unknown else files[-1:])

    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except (KeyError, ValueError) as e:
        raise _explain_merge_error(cfg, e, where) from e
    except AssertionError as e:
        raise ConfigError(f"{config_file}: {e}") from e
    return chain


def _merge_opts(cfg, opts):
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise _explain_merge_error(cfg, e, "command-line override") from e


def aa_stage_widths(cfg):
    """{stage: [(in_channels, out_channels, stride)]} of the AAConv2d layers the AA-ResNet builds for the
    stages in MODEL.AA.STAGES (deduplicated), from MODEL.RESNETS.*."""
    r = cfg.MODEL.RESNETS
    widths = {}
    out_ch, bottleneck = r.RES2_OUT_CHANNELS, r.NUM_GROUPS * r.WIDTH_PER_GROUP
    in_ch = r.STEM_OUT_CHANNELS
    for i, name in enumerate(aa_detection.modeling.backbone.STAGE_NAMES):
        first_stride = 1 if i == 0 or (name == "res5" and r.RES5_DILATION == 2) else 2
        if name in cfg.MODEL.AA.STAGES:
            if r.DEPTH < 50:
                convs = [(in_ch, out_ch, first_stride), (out_ch, out_ch, 1)]
            else:
                convs = [(bottleneck, bottleneck, 1 if r.STRIDE_IN_1X1 else first_stride),
                         (bottleneck, bottleneck, 1)]
            widths[name] = sorted(set(convs))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    return widths


def validate_aa_config(cfg, origin=lambda key: "config"):
    """ConfigError unless every layer the MODEL.AA settings ask for can be built.

    Checks MODEL.AA.STAGES names and, for an AA backbone, builds each augmented stage's AAConv2d shapes
    on the meta device (no memory) with the layer's own rules."""
    try:
        aa_detection.modeling.backbone.check_aa_stages(cfg)
    except ValueError as e:
        key = "MODEL.RESNETS.DEPTH" if "MODEL.RESNETS.DEPTH" in str(e) else "MODEL.AA.STAGES"
        raise ConfigError(f"{origin(key)}: {e}") from e
    if cfg.MODEL.BACKBONE.NAME not in AA_BACKBONES:
        return
    from .layers import AAConv2d
    from .layers.relative_attention import IMPLS

    aa = cfg.MODEL.AA
    if aa.IMPL not in IMPLS:
        raise ConfigError(f"{origin('MODEL.AA.IMPL')}: MODEL.AA.IMPL={aa.IMPL!r}: allowed values are {list(IMPLS)}")
    for name, convs in aa_stage_widths(cfg).items():
        for in_ch, out_ch, stride in convs:
            try:
                with torch.device("meta"):
                    AAConv2d(in_ch, out_ch, 3, stride=stride, num_heads=aa.NUM_HEADS, kappa=aa.KAPPA,
                             upsilon=aa.UPSILON, relative=aa.RELATIVE, impl=aa.IMPL, max_relative_size=1)
            except ValueError as e:
                keys = ("MODEL.AA.NUM_HEADS", "MODEL.AA.KAPPA", "MODEL.AA.UPSILON")
                set_in = "; ".join(sorted({f"{k} from {origin(k)}" for k in keys}))
                raise ConfigError(
                    f"MODEL.AA.NUM_HEADS={aa.NUM_HEADS}, MODEL.AA.KAPPA={aa.KAPPA}, MODEL.AA.UPSILON={aa.UPSILON} "
                    f"cannot build the attention-augmented convolutions of stage {name} "
                    f"({in_ch} -> {out_ch} channels): {e}. Allowed: NUM_HEADS >= 1 and dk, dv (the multiples "
                    f"of NUM_HEADS nearest KAPPA * {out_ch} and UPSILON * {out_ch}, at least NUM_HEADS) with "
                    f"dv < {out_ch}; or leave {name} out of MODEL.AA.STAGES. ({set_in})") from e


def _check_choice(cfg, key, allowed, origin):
    _, value = _node_and_leaf(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{origin(key)}: {key}={value!r}: allowed values are {list(allowed)}")


def setup_cfg(config_file=None, opts=(), datasets=()):
    """A frozen config: detectron2's defaults, the AA keys, `config_file`, then `opts` overrides.

    `datasets` (name, json_file, image_root) triples are appended to DATASETS.REGISTER. The datasets
    the config names are then registered (the synthetic one generated if missing) and
    MODEL.RETINANET.NUM_CLASSES is set from the training datasets' classes.

    Everything that can be checked without data is checked here, before any model is built: a missing
    config or _BASE_ file, invalid or unsafe YAML, an unknown key, a value of the wrong type, an unknown
    stage, MODEL.AA settings the layer cannot build, and the choice keys raise a ConfigError that names
    the file (or "command-line override") and the key, and says what is allowed.

    Importing this module registers the project's backbones, so any config built here can name them.
    """
    cfg = add_aa_config(get_cfg())
    chain = []
    if config_file:
        chain = _merge_file(cfg, config_file)
    opts = list(opts)
    _merge_opts(cfg, opts)

    def origin(key):
        if key in opts[::2]:
            return "command-line override"
        files = [f for f, data in chain if _defines(data, key)]
        return ", ".join(files) if files else "default"

    validate_aa_config(cfg, origin)
    _check_choice(cfg, "DATASETS.BAD_IMAGES", BAD_IMAGE_POLICIES, origin)
    _check_choice(cfg, "DATASETS.CHECK_IMAGES", IMAGE_CHECKS, origin)
    cfg.DATASETS.REGISTER = [list(d) for d in cfg.DATASETS.REGISTER] + [list(d) for d in datasets]
    from .data.datasets import register_datasets_from_cfg

    register_datasets_from_cfg(cfg)
    cfg.freeze()
    return cfg
