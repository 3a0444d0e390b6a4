"""DistributedDataParallel for the project's trainers, CPU multi-process runs included."""
import torch
from detectron2.engine import create_ddp_model

__all__ = ["ddp_model"]


def ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's `create_ddp_model`; for a CPU model of a multi-process run with `device_ids=None`:
    `create_ddp_model` passes `device_ids=[local_rank]`, which DistributedDataParallel rejects for CPU
    modules (tests/test_train_net.py checks that upstream still does so)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return create_ddp_model(model, **kwargs, **({"device_ids": None} if on_cpu else {}))
