"""Parameter and FLOP counts shared by the tools (fvcore conventions: one multiply-add is one flop).

fvcore counts convolutions, linear layers and matmul-like ops from a trace, but what an attention path
emits depends on the path (dense einsums, a scaled_dot_product_attention over padded widths, a compiled
kernel fvcore cannot see). `flop_count` therefore counts the attention core of every AAConv2d from its
real shapes (`AAConv2d.attention_flops`: q.k, the relative logits q.r^H, q.r^W, and p.v) and drops
whatever matmul-like ops the traced path emitted inside the layer, so every path counts the same.
"""
from collections import Counter
from typing import Any, Dict, Sequence, Tuple

import torch

from .layers import AAConv2d

__all__ = ["analyze_config", "attention_liveness", "count_parameters", "flop_count"]

# fvcore operator names an attention path may emit; inside an AAConv2d they are the attention core.
_ATTENTION_OPS = ("einsum", "matmul", "bmm", "scaled_dot_product_attention")


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """{"total": all parameters, "trainable": those with requires_grad} of a module."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def flop_count(model: torch.nn.Module, inputs: tuple) -> Tuple[int, Counter]:
    """fvcore FlopCountAnalysis of a detectron2 model (or any module), attention cores counted exactly.

    `inputs` is the tuple of positional arguments of model.forward (for a detectron2 meta-architecture,
    `([{"image": tensor}],)`). Returns (total flops, Counter {operator: flops}) where the attention cores
    of the AAConv2d layers are under "attention". Run the model in eval mode.
    """
    try:
        from detectron2.utils.analysis import FlopCountAnalysis
    except ImportError:  # plain torch modules without detectron2
        from fvcore.nn import FlopCountAnalysis
    attention = {}
    hooks = [
        module.register_forward_hook(lambda m, x, out, name=name: attention.update({name: m.attention_flops(out)}))
        for name, module in model.named_modules()
        if isinstance(module, AAConv2d)
    ]
    try:
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            by_operator = Counter(analysis.by_operator())
        by_module = analysis.by_module_and_operator()
    finally:
        for hook in hooks:
            hook.remove()
    # detectron2's analysis wraps the model, so its module names may carry a prefix.
    traced = [ops for scope, ops in by_module.items() if any(scope == n or scope.endswith("." + n) for n in attention)]
    for ops in traced:
        for op in _ATTENTION_OPS:
            by_operator[op] -= ops.get(op, 0)
    by_operator = Counter({op: int(round(float(n))) for op, n in by_operator.items() if n > 0})
    by_operator["attention"] = sum(attention.values())
    return sum(by_operator.values()), by_operator


def analyze_config(config_file: str, opts: Sequence[str] = (), size: Tuple[int, int] = (800, 1333),
                   flops: bool = True, trusted: Sequence[str] = ()) -> Dict[str, Any]:
    """{"config", "params", "backbone_params"[, "gflops", "attention_gflops"]} of one config's model (random
    weights, CPU), FLOPs for one image of `size` (H, W); `trusted`: as for `setup_cfg`."""
    from detectron2.modeling import build_model

    from .config import setup_cfg

    cfg = setup_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu"], trusted=trusted)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    backbone = getattr(model.backbone, "bottom_up", model.backbone)
    row = {"config": config_file, "params": count_parameters(model)["total"],
           "backbone_params": count_parameters(backbone)["total"]}
    if flops:
        image = torch.rand(3, *size) * 255
        total, by_op = flop_count(model, ([{"image": image, "height": size[0], "width": size[1]}],))
        row["gflops"], row["attention_gflops"] = total / 1e9, by_op["attention"] / 1e9
    return row


def attention_liveness(config_file: str, opts: Sequence[str] = (), num_images: int = 4,
                       trusted: Sequence[str] = ()) -> Dict[str, Any]:
    """{AAConv2d name: LayerLiveness} of a config's model with its MODEL.WEIGHTS (random without), over one
    training step (forward and backward, no update) on the first `num_images` images of its first
    training dataset, on the CPU; see `aa_detection.modeling.liveness`."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from .checkpoint import AACheckpointer
    from .config import setup_cfg
    from .modeling.liveness import AttentionProbe

    cfg = setup_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu"], prepare_data=True, trusted=trusted)
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AACheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]]
    probe = AttentionProbe(model.train())
    with probe, EventStorage():
        loss = sum(model(batch).values())
    loss.backward()
    return probe.report()
