"""The project's config keys and the steps every tool builds its config with.

1. `load_cfg(config_file, opts, datasets)`: detectron2's defaults, the AA keys, the file with its
   ``_BASE_`` files, then the ``KEY VALUE`` overrides. It reads each YAML file once (safe loading) and
   writes nothing; it also returns where each key was set, for the messages of step 2.
2. `validate_cfg(cfg, origins)`: the choice keys, ``DATASETS.REGISTER``, and the backbone, built by its
   own builder on the meta device (no memory), so the builder's rules are the only ones.
3. `aa_detection.data.register_datasets(cfg)` registers the datasets the config names and sets the
   class count; `aa_detection.data.prepare_datasets(cfg)`, called by training before it, generates the
   synthetic dataset when it is missing and checks the datasets (cached on disk).

`setup_cfg` runs these steps in order and freezes the config. Each step raises a `ConfigError` naming
the file (or "command-line override") and the key, and saying what is allowed.

yacs reports a value of the wrong type as a plain ValueError whose key is in its text only; the files
and overrides are therefore merged one key at a time (`CfgNode.merge_from_list`), so each error is
attributed to its key and file without reading the text. Unknown keys are found before merging, by
walking the config.
"""
import argparse
import difflib
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
import torch
import yaml

from .data.validation import BAD_IMAGE_POLICIES, IMAGE_CHECKS
from .errors import ConfigError
from .layers.relative_attention import IMPLS
from .layers.spec import AttentionSpec
from .modeling.backbone import RESNET_BLOCKS, STAGE_NAMES

__all__ = ["ConfigError", "add_aa_config", "add_aa_defaults", "load_cfg", "validate_cfg", "setup_cfg",
           "BAD_IMAGE_POLICIES", "OPTIMIZERS", "AA_BACKBONES"]

# Backbones built from MODEL.AA.
AA_BACKBONES = ("build_aa_resnet_backbone", "build_retinanet_aa_resnet_fpn_backbone", "build_aa_resnet_fpn_backbone")
# SOLVER.OPTIMIZER values (any case).
OPTIMIZERS = ("SGD", "ADAMW")
OVERRIDE = "command-line override"
# A config key as the command line names it: SEED, MODEL.AA.STAGES.
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def add_aa_config(cfg: CN) -> CN:
    """Add the MODEL.AA node (attention augmentation of the ResNet backbone) to a detectron2 config."""
    # The attention options with AttentionSpec's defaults (aa_detection/layers/spec.py, a line of help
    # each; docs/MODEL.md says why each default is what it is): STAGES, augmented from the last stage
    # down as the paper does; NUM_HEADS; KAPPA = dk / Fout; UPSILON = dv / Fout; RELATIVE (2D relative
    # position logits); IMPL, the attention path; NORM, the attention channels' norm ("" keeps a trained
    # block norm over the concatenation, the paper's, and gives the attention channels of a frozen one a
    # trained BN of their own); ATTENTION_GAIN, their initial weight in that norm (> 0: exact zeros before a
    # ReLU never get a gradient); DOWNSAMPLE_STAGES, whose attention runs on its input pooled 2x2.
    cfg.MODEL.AA = CN(AttentionSpec.config_keys())
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
    # How images are checked: "header" reads each file's header (format, size, EXIF orientation);
    # "decode" also decodes every image whole, which finds truncated files but is much slower.
    cfg.DATASETS.CHECK_IMAGES = "header"
    # Where the results of the dataset checks are kept, one file per dataset, reused while the JSON file
    # and the image folder are unchanged. "" means $XDG_CACHE_HOME/aa_detection/dataset_checks
    # (~/.cache/aa_detection/dataset_checks).
    cfg.DATASETS.CHECK_CACHE_DIR = ""

    # Pickle weight files (.pkl) may hold only tensors, arrays and plain containers; True loads any
    # object (which can run code): set it only for files whose source you trust.
    cfg.MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE = False

    # "SGD" (detectron2's default optimizer) or "ADAMW" (trains small models from scratch faster).
    cfg.SOLVER.OPTIMIZER = "SGD"
    return cfg


# ------------------------------------------------------------------------------------------ loading
def model_zoo_config_dir() -> str:
    """The folder of the installed detectron2's model-zoo configs (its own files, trusted as code)."""
    from detectron2 import model_zoo

    return os.path.join(os.path.dirname(os.path.abspath(model_zoo.__file__)), "configs")


def _is_trusted(path, trusted):
    real = os.path.realpath(path)
    zoo = os.path.realpath(model_zoo_config_dir())
    return real.startswith(zoo + os.sep) or real in {os.path.realpath(t) for t in trusted}


def _resolve(path, folder="."):
    """A config path as given (relative to `folder`), else the model-zoo config of that name
    (e.g. "COCO-Detection/retinanet_R_50_FPN_1x.yaml")."""
    local = os.path.join(folder, os.path.expanduser(path))
    zoo = os.path.join(model_zoo_config_dir(), path)
    return os.path.abspath(zoo if not os.path.isfile(local) and os.path.isfile(zoo) else local)


def _read_yaml(path, referrer=None, trusted=()):
    """The mapping in one YAML config file, read with safe loading (the installed detectron2's model-zoo
    files and the files in `trusted` with full loading, as detectron2 reads them); ConfigError naming the
    file."""
    if not os.path.isfile(path):
        where = f" (the _BASE_ of {referrer})" if referrer else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.unsafe_load(f) if _is_trusted(path, trusted) else yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(
            f"{path}: refusing an unsafe YAML tag ({e.problem.strip() if e.problem else e}): configs are read "
            "with safe loading, which allows plain values, lists and mappings only (no !!python tags); "
            "detectron2's own model-zoo configs are trusted, and a file you trust can be named with "
            "--trust-config") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except OSError as e:
        raise ConfigError(f"config file cannot be read: {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got a {type(data).__name__}")
    return data


def _config_chain(path, referrer=None, seen=(), trusted=()):
    """[(file, mapping without _BASE_)] of `path` and its _BASE_ files (a path or a list, relative to the
    file or a model-zoo name), bases first."""
    if path in seen:
        raise ConfigError(f"{referrer}: _BASE_ cycle through {path}")
    data = _read_yaml(path, referrer, trusted)
    bases = data.pop("_BASE_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    chain = []
    for base in bases:
        chain += _config_chain(_resolve(base, os.path.dirname(path)), path, seen + (path,), trusted)
    return chain + [(path, data)]


def _unknown_key(node, parent, part, full_key, where):
    """ConfigError for `full_key`, whose part `part` is not a key of `node` (the node at `parent`)."""
    keys = sorted(node.keys())
    close = difflib.get_close_matches(str(part), keys, n=3)
    qualified = [f"{parent}.{c}" if parent else c for c in close]
    missing = f"{parent}.{part}" if parent else str(part)
    return ConfigError(
        f"{where}: unknown config key {full_key}" + (f" ({missing} does not exist)" if missing != full_key else "")
        + (f"; did you mean {', '.join(qualified)}?" if close else ".")
        + f" Keys allowed under {parent or 'the root'}: {keys}")


def _set(cfg, full_key, value, where):
    """Merge one KEY VALUE (a YAML value or an override's text) as yacs does; ConfigError naming the key."""
    node = cfg
    parts = full_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, CN) or part not in node:
            if not isinstance(node, CN):
                raise ConfigError(f"{where}: unknown config key {full_key}: {'.'.join(parts[:i])} is a value, "
                                  "not a group of keys")
            raise _unknown_key(node, ".".join(parts[:i]), part, full_key, where)
        default, node = node[part], node[part]
    try:
        cfg.merge_from_list([full_key, value])
    except ValueError as e:  # yacs: "Type mismatch ..."
        raise ConfigError(f"{where}: {full_key} must be of type {type(default).__name__} like its default "
                          f"{default!r} ({e})") from e
    except (KeyError, AssertionError) as e:  # yacs: a renamed key
        raise ConfigError(f"{where}: {full_key}: {e}") from e


def _merge_mapping(cfg, mapping, where, origins, prefix=""):
    for key, value in mapping.items():
        full_key = f"{prefix}{key}"
        node = cfg
        for part in full_key.split(".")[:-1]:
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(key), CN):
            _merge_mapping(cfg, value, where, origins, full_key + ".")
        else:
            _set(cfg, full_key, value, where)
            origins[full_key] = where


def add_aa_defaults() -> None:
    """Add the project's keys to detectron2's default config, so `get_cfg()` in detectron2's own tools
    (demo, analyze_model, export) knows them after `import aa_detection` (which calls this).

    detectron2 has no hook for extending its defaults: `get_cfg()` returns a clone of
    `detectron2.config.defaults._C`, so the keys are added there, once; tests/test_configs.py fails if
    detectron2 stops building configs that way."""
    from detectron2.config import defaults

    if "AA" not in defaults._C.MODEL:
        add_aa_config(defaults._C)


def load_cfg(config_file: Optional[str] = None, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = (),
             trusted: Sequence[str] = ()) -> Tuple[CN, Dict[str, str]]:
    """(config, origins): detectron2's defaults, the AA keys, `config_file` (and its _BASE_ files), then
    the `opts` KEY VALUE overrides; `datasets` (name, json_file, image_root) triples are appended to
    DATASETS.REGISTER. `origins` maps each key set by a file or override to that file's path or
    "command-line override". The config is not validated and not frozen; nothing is registered.

    A missing or unreadable file, invalid YAML, an unsafe YAML tag, an unknown key (with its close
    matches and the keys allowed in its node) and a value of the wrong type raise ConfigError naming
    the file that sets it, or the override. `config_file` may be a detectron2 model-zoo name; the
    model-zoo files and the files in `trusted` may hold Python tags (detectron2's Base-RetinaNet.yaml does).
    """
    cfg = add_aa_config(get_cfg())
    version = cfg.VERSION
    origins = {}
    if config_file:
        for path, mapping in _config_chain(_resolve(config_file), trusted=trusted):
            _merge_mapping(cfg, mapping, path, origins)
            if cfg.VERSION != version:
                raise ConfigError(f"{path}: VERSION {cfg.VERSION}: only detectron2 configs of version {version} "
                                  "are read; upgrade it with detectron2.config.compat.upgrade_config")
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; got an odd number: {opts}")
    for key, value in zip(opts[::2], opts[1::2]):
        _set(cfg, str(key), value, OVERRIDE)
        origins[str(key)] = OVERRIDE
    if datasets:
        cfg.DATASETS.REGISTER = [list(d) for d in cfg.DATASETS.REGISTER] + [list(d) for d in datasets]
        origins["DATASETS.REGISTER"] = "command line (--dataset)"
    return cfg, origins


# --------------------------------------------------------------------------------------- validation
def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_choice(cfg, key, allowed, origin, any_case=False):
    value = _value(cfg, key)
    folded = value.upper() if any_case and isinstance(value, str) else value
    if folded not in allowed:
        raise ConfigError(f"{origin(key)}: {key}={value!r}: allowed values are {list(allowed)}"
                          + (" (any case)" if any_case else ""))


def _check_subset(cfg, key, allowed, origin):
    values = list(_value(cfg, key))
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"{origin(key)}: {key}={values} has {unknown}: allowed values are {list(allowed)}")


def _check_register(cfg, origin):
    for entry in cfg.DATASETS.REGISTER:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(isinstance(x, str) for x in entry):
            raise ConfigError(f"{origin('DATASETS.REGISTER')}: DATASETS.REGISTER entries are [name, json_file, "
                              f"image_root] (3 strings), got {entry!r}")


# config keys named in a builder's ValueError, e.g. "MODEL.RESNETS.DEPTH=42: allowed values are ...", and
# the keys of the same node it names by their last part ("MODEL.RESNETS.RES2_OUT_CHANNELS=64, NUM_GROUPS=1")
_KEY_IN_MESSAGE = re.compile(r"\b(?:MODEL|INPUT)(?:\.[A-Z0-9_]+)+")
_WORD_IN_MESSAGE = re.compile(r"\b[A-Z][A-Z0-9_]+\b")


def _keys_in_message(cfg, message):
    keys = set()
    for key in _KEY_IN_MESSAGE.findall(message):
        node_key = key.rpartition(".")[0]
        node = _value(cfg, node_key)
        keys.add(key)
        keys.update(f"{node_key}.{w}" for w in _WORD_IN_MESSAGE.findall(message) if w in node)
    return sorted(keys)


_AA_LAYER_KEYS = ("MODEL.AA.NUM_HEADS", "MODEL.AA.KAPPA", "MODEL.AA.UPSILON")


def _builds_on_meta(cfg):
    """None when MODEL.BACKBONE.NAME's builder builds `cfg`'s backbone on the meta device, else its error."""
    try:
        with torch.device("meta"):
            build_backbone(cfg)
    except (ValueError, AssertionError) as e:
        return e
    return None


def _first_failing_stage(cfg):
    """The first stage of MODEL.AA.STAGES whose attention-augmented layers cannot be built alone."""
    for stage in cfg.MODEL.AA.STAGES:
        alone = cfg.clone()
        alone.defrost()
        alone.MODEL.AA.STAGES = [stage]
        if _builds_on_meta(alone) is not None:
            return stage
    return None


def _backbone_error(cfg, error, origin):
    """A ConfigError for a ValueError or AssertionError of the backbone builder, naming the keys."""
    keys = _keys_in_message(cfg, str(error))
    if keys:  # the builder names the keys at fault
        where = sorted({origin(k) for k in keys} - {"default"}) or ["default"]
        set_in = "; ".join(f"{k} from {origin(k)}" for k in keys)
        return ConfigError(f"{', '.join(where)}: {error} ({set_in})")
    if cfg.MODEL.BACKBONE.NAME in AA_BACKBONES:  # the AAConv2d layer's own rules
        aa = cfg.MODEL.AA
        stage = _first_failing_stage(cfg)
        set_in = "; ".join(f"{k} from {origin(k)}" for k in _AA_LAYER_KEYS)
        return ConfigError(
            f"MODEL.AA.NUM_HEADS={aa.NUM_HEADS}, MODEL.AA.KAPPA={aa.KAPPA}, MODEL.AA.UPSILON={aa.UPSILON} cannot "
            f"build the attention-augmented convolutions of stage {stage}: {error}. Allowed: NUM_HEADS >= 1 and "
            "dk, dv (the multiples of NUM_HEADS nearest KAPPA * Fout and UPSILON * Fout, at least NUM_HEADS) "
            f"with dv < Fout, the layer's output channels; or leave {stage} out of MODEL.AA.STAGES. ({set_in})")
    name = cfg.MODEL.BACKBONE.NAME
    return ConfigError(f"{origin('MODEL.BACKBONE.NAME')}: MODEL.BACKBONE.NAME={name!r} cannot build a backbone "
                       f"from this config: {error}")


def validate_cfg(cfg: CN, origins: Optional[Dict[str, str]] = None) -> CN:
    """ConfigError unless `cfg` can be used: the choice keys (SOLVER.OPTIMIZER, MODEL.AA.IMPL,
    DATASETS.BAD_IMAGES, DATASETS.CHECK_IMAGES, MODEL.BACKBONE.NAME), MODEL.AA.STAGES and
    MODEL.RESNETS.DEPTH, DATASETS.REGISTER entries, the backbone itself, built on the meta device
    by its builder, and a converted MODEL.WEIGHTS file against the config (`check_weights_format`).
    `origins` (from `load_cfg`) names where each key was set; keys not in it are
    reported as "default"."""
    origins = origins or {}

    def origin(key: str) -> str:
        return origins.get(key, "default")

    _check_choice(cfg, "SOLVER.OPTIMIZER", OPTIMIZERS, origin, any_case=True)
    _check_choice(cfg, "MODEL.AA.IMPL", IMPLS, origin)
    _check_choice(cfg, "DATASETS.BAD_IMAGES", BAD_IMAGE_POLICIES, origin)
    _check_choice(cfg, "DATASETS.CHECK_IMAGES", IMAGE_CHECKS, origin)
    _check_choice(cfg, "MODEL.BACKBONE.NAME", sorted(name for name, _ in BACKBONE_REGISTRY), origin)
    _check_register(cfg, origin)
    _check_choice(cfg, "MODEL.RESNETS.DEPTH", sorted(RESNET_BLOCKS), origin)  # the plain builder's too
    for key in ("MODEL.AA.STAGES", "MODEL.AA.DOWNSAMPLE_STAGES"):
        _check_subset(cfg, key, STAGE_NAMES, origin)
    error = _builds_on_meta(cfg)
    if error is not None:
        raise _backbone_error(cfg, error, origin) from error
    if os.path.isfile(cfg.MODEL.WEIGHTS):  # weights that say what they need (pixel format, architecture)
        from .pretraining.convert import check_weights_format

        check_weights_format(cfg, cfg.MODEL.WEIGHTS)
    return cfg


def add_trust_config_argument(parser) -> None:
    """`--trust-config FILE` (repeatable) on an argparse parser: the config files that may hold Python tags,
    passed to `load_cfg` / `setup_cfg` as `trusted`. Every tool that reads a config takes it."""
    parser.add_argument(
        "--trust-config", action="append", default=[], metavar="FILE",
        help="read this config file (a --config-file or a _BASE_) even if it holds Python tags, which run code "
             "(repeatable; detectron2's own model-zoo configs are always read)")


def add_overrides_argument(parser) -> None:
    """The positional `opts` on an argparse parser: config overrides, ``KEY VALUE`` pairs at the end of the
    command, as detectron2's `default_argument_parser` takes them."""
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
        help="config overrides, KEY VALUE pairs at the end of the command (as in detectron2's tools)")


def split_overrides(items: Sequence[str], opts: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """(files, overrides) of the list an option of several files took: argparse gives the ``KEY VALUE``
    pairs after ``--configs a.yaml b.yaml`` to that list. The files end at the first config key (``SEED``,
    ``MODEL.AA.STAGES``: upper case, dotted, not an existing path); the overrides are the rest, then `opts`."""
    items = list(items)
    end = next((i for i, item in enumerate(items) if CONFIG_KEY.match(item) and not os.path.exists(item)),
               len(items))
    return items[:end], [*items[end:], *opts]


def setup_cfg(config_file: Optional[str] = None, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = (),
              prepare_data: bool = False, trusted: Sequence[str] = ()) -> CN:
    """A frozen config: `load_cfg`, `validate_cfg`, then `aa_detection.data.register_datasets` (which
    sets MODEL.RETINANET.NUM_CLASSES and MODEL.ROI_HEADS.NUM_CLASSES from the training datasets); with
    `prepare_data`, `aa_detection.data.prepare_datasets` first (generates the synthetic dataset when it is
    named and missing; checks the named datasets, the result cached on disk).

    Everything that can be checked without data is checked before any model is built; see the steps.
    Importing this module registers the project's backbones, so any config built here can name them.
    """
    from .data import prepare_datasets, register_datasets

    cfg, origins = load_cfg(config_file, opts, datasets, trusted)
    validate_cfg(cfg, origins)
    if prepare_data:
        prepare_datasets(cfg)
    register_datasets(cfg)
    cfg.freeze()
    return cfg
