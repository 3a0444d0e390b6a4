"""The project's config keys and the one setup every tool and test builds its config with."""
import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

import aa_detection.modeling  # noqa: F401  (registers the AA backbones)

__all__ = ["add_aa_config", "setup_cfg"]


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
    cfg.MODEL.AA.IMPL = "auto"  # attention implementation: "auto", "naive" or "fused"
    # Each augmented stage sizes its relative tables from INPUT.MAX_SIZE_TRAIN: ceil(MAX_SIZE_TRAIN / stride)
    # rows per side (res3 stride 8, res4 16, res5 32); offsets beyond the largest training map clip to
    # the last row.

    # COCO-format datasets registered at setup: a list of [name, json_file, image_root].
    cfg.DATASETS.REGISTER = []
    # The generated shapes dataset behind the names "synthetic_train" and "synthetic_val".
    cfg.DATASETS.SYNTHETIC = CN()
    cfg.DATASETS.SYNTHETIC.ROOT = ""  # "" means $DETECTRON2_DATASETS/synthetic (datasets/synthetic)
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN = 800
    cfg.DATASETS.SYNTHETIC.NUM_VAL = 200
    cfg.DATASETS.SYNTHETIC.SEED = 0

    # "SGD" (detectron2's default optimizer) or "ADAMW" (trains small models from scratch faster).
    cfg.SOLVER.OPTIMIZER = "SGD"
    return cfg


def setup_cfg(config_file=None, opts=(), datasets=()):
    """A frozen config: detectron2's defaults, the AA keys, `config_file`, then `opts` overrides.

    `datasets` (name, json_file, image_root) triples are appended to DATASETS.REGISTER. The datasets
    the config names are then registered (the synthetic one generated if missing) and
    MODEL.RETINANET.NUM_CLASSES is set from the training datasets' classes.

    Importing this module registers the project's backbones, so any config built here can name them.
    """
    cfg = add_aa_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    aa_detection.modeling.backbone.check_aa_stages(cfg)
    cfg.DATASETS.REGISTER = [list(d) for d in cfg.DATASETS.REGISTER] + [list(d) for d in datasets]
    from .data.datasets import register_datasets_from_cfg

    register_datasets_from_cfg(cfg)
    cfg.freeze()
    return cfg
