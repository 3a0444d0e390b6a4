"""The AdamW optimizer of the configs (YAML `SOLVER.OPTIMIZER: "ADAMW"` and the LazyConfigs)."""
from typing import Iterable, Mapping, Optional

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["adamw"]


def adamw(params: Iterable, lr: float, weight_decay: float,
          clip_gradients: Optional[Mapping] = None) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (tensors or param groups) whose step first clips the gradients the
    way detectron2's `SOLVER.CLIP_GRADIENTS` does; `clip_gradients` holds that node's keys, e.g.
    {"CLIP_TYPE": "norm", "CLIP_VALUE": 2.0} (ENABLED defaults to True); None: no clipping."""
    clip = {"ENABLED": clip_gradients is not None, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0, "NORM_TYPE": 2.0}
    clip.update(clip_gradients or {})
    solver = CfgNode({"SOLVER": {"CLIP_GRADIENTS": clip}})
    return maybe_add_gradient_clipping(solver, torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
