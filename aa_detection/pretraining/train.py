"""Pretraining AA-ResNet classifiers on an ImageFolder dataset (DIR/train/<class>/*, DIR/val/<class>/*).

timm's pieces do the work: `create_dataset`/`create_loader` (RandomResizedCrop, flip, colour jitter;
resize + centre crop for evaluation), `create_optimizer_v2`, `create_scheduler_v2` (stepped every
update), `ModelEmaV3`; torch's autocast + GradScaler give mixed precision on CUDA, and
DistributedDataParallel runs under `torchrun` (initialised from its environment variables; a plain
`python` run is one process).

The default recipe (`--help` lists it): SGD with momentum 0.9, lr 0.1 per 256 images of the global
batch, 5 warmup epochs then cosine decay to 0, weight decay 1e-4 (none on biases, norms and relative
tables), label smoothing 0.1, 100 epochs, 224 px. The project's paper notes give the ImageNet accuracies
of Bello et al. but not their training recipe, so these are this project's choices (the common ResNet
recipe), not the paper's.

Output files in --output: `log.txt`; `metrics.jsonl`, one JSON line per epoch (train loss, lr, top-1 and
top-5 in %, the EMA's with --ema, and, measured on the epoch's last training step, the share of
attention channels alive and the attention-to-convolution output ratio per stage, `attention/<stage>/alive`
and `attention/<stage>/attention_to_conv`, as in detectron2's metrics.json; a warning names the layers with
dead attention); `last.pth` after every epoch and `best.pth` (best top-1 of the
evaluated weights: the EMA's with --ema), each written to a temporary file and renamed. `--resume`
continues from last.pth: epoch, model, optimizer, scheduler, EMA and GradScaler states; the random
state of every epoch is derived from (seed, epoch, rank), so a resumed run draws what an uninterrupted
one would, and metrics.jsonl keeps only the epochs before the resumed one.
"""
import argparse
import contextlib
from dataclasses import fields
import datetime
import json
import logging
import os
import random
import time
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import DatasetError
from ..layers import AttentionSpec
from ..layers.relative_attention import IMPLS
from ..modeling.liveness import AttentionProbe, dead_layers_message, liveness_scalars
from ..safe_io import atomic_write, load_torch_weights

__all__ = ["build_argument_parser", "pretrain", "model_kwargs"]

logger = logging.getLogger(__name__)

# Model keyword arguments settable from the command line (MODEL.AA's meanings; None keeps the model default).
MODEL_OPTIONS = tuple(f.name for f in fields(AttentionSpec)) + (
    "stride_in_1x1", "norm", "stem_out_channels", "res2_out_channels", "width_per_group")


def build_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate an AA-ResNet classifier on an ImageFolder dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder with train/<class>/* and val/<class>/*")
    p.add_argument("--model", default="aa_resnet50", help="timm name: aa_resnet18/34/50/101 or d2_resnet* (plain)")
    p.add_argument("--output", required=True, help="folder for log.txt, metrics.jsonl, last.pth, best.pth")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    p.add_argument("--epochs", type=int, default=100, help="length of the schedule")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="stop this run after this epoch count (the schedule still spans --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="images per process and step")
    p.add_argument("--img-size", type=int, default=224, help="training and evaluation image size")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default lr-base * global batch / 256")
    p.add_argument("--lr-base", type=float, default=0.1)
    p.add_argument("--opt", default="momentum", help="timm optimizer name ('momentum': SGD, no Nesterov)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--sched", default="cosine", help="timm scheduler name")
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--warmup-lr", type=float, default=1e-6)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--no-aug", action="store_true", help="train on resized centre crops (no random augmentation)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="evaluation framing: resize to img-size / crop-pct, then crop img-size (default 1.0 with "
                        "--no-aug, whose training images are whole images squashed to img-size; else the model's 0.875)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop's range of the crop's area, as a fraction of the image's")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="float16 autocast + GradScaler (CUDA only)")
    p.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights")
    p.add_argument("--ema-decay", type=float, default=0.9998)
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    p.add_argument("--log-interval", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g = p.add_argument_group("model (MODEL.AA meanings; unset keeps the model default)")
    for option in fields(AttentionSpec):  # --aa-stages, --num-heads, ..., --downsample-stages
        flag = "--" + option.name.replace("_", "-")
        text = f"{option.metadata['help']} (MODEL.AA.{option.metadata['key']})"
        if isinstance(option.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(option.default, tuple):
            g.add_argument(flag, nargs="*", default=None, help=text)
        else:
            g.add_argument(flag, type=type(option.default), default=None, help=text,
                           choices=IMPLS if option.name == "impl" else None)
    g.add_argument("--stride-in-1x1", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--norm", default=None, help="block norm (default BN)")
    g.add_argument("--stem-out-channels", type=int, default=None, help="MODEL.RESNETS.STEM_OUT_CHANNELS")
    g.add_argument("--res2-out-channels", type=int, default=None, help="MODEL.RESNETS.RES2_OUT_CHANNELS")
    g.add_argument("--width-per-group", type=int, default=None, help="MODEL.RESNETS.WIDTH_PER_GROUP")
    return p


def model_kwargs(args: argparse.Namespace) -> dict:
    """The model keyword arguments the command line sets; the relative tables cover --img-size."""
    kwargs = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    kwargs["max_input_size"] = args.img_size
    return kwargs


# ---- processes ---------------------------------------------------------------------------------------
def _init_distributed(device_arg: Optional[str]):
    """(rank, world_size, device); torchrun's RANK/WORLD_SIZE/LOCAL_RANK start the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world_size, device
    return 0, 1, device


def _seed_epoch(seed: int, epoch: int, rank: int):
    """Python, NumPy and torch random states from (seed, epoch, rank): what an epoch draws does not depend
    on whether the run was resumed."""
    s = seed + 1_000_003 * epoch + 7919 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- data --------------------------------------------------------------------------------------------
def _datasets(root: str):
    """(train, val) ImageFolder datasets of `root`; the val split is read only once train/ was found."""
    train = _split_dataset(root, "train", is_training=True)
    return train, _split_dataset(root, "val", class_map=train.reader.class_to_idx)


def _split_dataset(root: str, split: str, **kwargs):
    from timm.data import create_dataset

    expected = "expected images in train/<class>/ and val/<class>/"
    try:
        dataset = create_dataset("", root=root, split=split, **kwargs)
    except RuntimeError as e:  # timm finds no images
        raise DatasetError(f"--data {root}: {e}; {expected}") from e
    # timm reads `root` itself for a split it finds no folder of (by its names: train/, val/, validation/...)
    if os.path.abspath(dataset.reader.root) == os.path.abspath(root):
        raise DatasetError(f"--data {root}: no {split}/ folder; {expected}")
    return dataset


def eval_framing(args: argparse.Namespace, data_config: dict) -> dict:
    """timm's evaluation framing ({"crop_pct", "crop_mode"}): with --no-aug, timm trains on whole images
    squashed to --img-size, and the evaluation shows them the same way (crop 1.0, "squash") instead of a
    1/0.875 zoom, which tests another framing; else a centre crop of the model's crop_pct. --crop-pct
    sets the fraction."""
    if args.no_aug:
        return {"crop_pct": args.crop_pct or 1.0, "crop_mode": "squash"}
    return {"crop_pct": args.crop_pct or data_config["crop_pct"], "crop_mode": "center"}


def _loaders(args, data_config, train_set, val_set, device, distributed):
    from timm.data import create_loader

    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"], **eval_framing(args, data_config),
                  num_workers=args.workers, distributed=distributed, device=device,
                  use_prefetcher=device.type == "cuda", pin_memory=device.type == "cuda")
    train = create_loader(train_set, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
                          scale=tuple(args.scale), **common)
    val = create_loader(val_set, batch_size=args.batch_size, is_training=False, **common)
    return train, val


# ---- epochs ------------------------------------------------------------------------------------------
def _autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled)


def _train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, ema, state, args, device):
    """One epoch; returns (mean training loss, last lr, the liveness report of its last step: {} without
    attention). state: epoch, num_epochs, updates (counted on)."""
    model.train()
    amp = scaler is not None
    num_iters = len(loader)
    loss_sum, count, start = 0.0, 0, time.perf_counter()
    probe, liveness = AttentionProbe(_unwrap(model)), {}
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        probed = i + 1 == num_iters and bool(probe.layers)
        with probe if probed else contextlib.nullcontext(), _autocast(device, amp):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if probed:
            liveness = probe.report()
        if amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["updates"] += 1
        scheduler.step_update(num_updates=state["updates"])
        if ema is not None:
            ema.update(_unwrap(model), step=state["updates"])
        loss_sum += float(loss.detach()) * images.shape[0]
        count += images.shape[0]
        if (i + 1) % args.log_interval == 0 or i + 1 == num_iters:
            per_iter = (time.perf_counter() - start) / (i + 1)
            left = num_iters - i - 1 + num_iters * (state["num_epochs"] - state["epoch"] - 1)
            logger.info("epoch %d/%d iter %d/%d loss %.4f lr %.3g %.1f img/s/process eta epoch %s total %s",
                        state["epoch"] + 1, state["num_epochs"], i + 1, num_iters, loss.item(),
                        optimizer.param_groups[0]["lr"], images.shape[0] / per_iter,
                        datetime.timedelta(seconds=round(per_iter * (num_iters - i - 1))),
                        datetime.timedelta(seconds=round(per_iter * left)))
    loss_sum, count = _all_sum([loss_sum, count], device)
    return loss_sum / max(count, 1), optimizer.param_groups[0]["lr"], liveness


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> dict:
    """{"top1", "top5"} in % over the loader (all processes), top-5 as top-k with k = min(5, classes)."""
    model.eval()
    correct1 = correct5 = total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with _autocast(device, amp):
            logits = model(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += targets.shape[0]
    correct1, correct5, total = _all_sum([correct1, correct5, total], device)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


# ---- files -------------------------------------------------------------------------------------------
def _save(path, data):
    with atomic_write(path, "wb") as f:
        torch.save(data, f)


def _metrics_before(path, epoch):
    """Records of metrics.jsonl for epochs before `epoch` (a resumed run writes the later ones again);
    lines that are not such records are dropped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < epoch:
                records.append(record)
    return records


def _write_metrics(path, records):
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def pretrain(args: argparse.Namespace) -> dict:
    """Train `args.model` on `args.data` as the command line describes; returns the last epoch's record."""
    import timm
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from detectron2.utils.logger import setup_logger

    from . import classifiers  # noqa: F401  (registers the models)

    rank, world_size, device = _init_distributed(args.device)
    train_set, val_set = _datasets(args.data)  # before anything is written
    os.makedirs(args.output, exist_ok=True)
    setup_logger(os.path.join(args.output, "log.txt"), distributed_rank=rank, name="aa_detection")
    amp = args.amp and device.type == "cuda"
    logger.info("seed %d, %d process(es) on %s, mixed precision %s, arguments %s",
                args.seed, world_size, device, amp, json.dumps(vars(args)))
    _seed_epoch(args.seed, -1, rank)  # model initialisation

    classes = sorted(train_set.reader.class_to_idx, key=train_set.reader.class_to_idx.get)
    kwargs = model_kwargs(args)
    input_size = (3, args.img_size, args.img_size)
    model = timm.create_model(args.model, num_classes=len(classes), pretrained_cfg_overlay=dict(
        input_size=input_size, pool_size=(-(-args.img_size // 32),) * 2), **kwargs)
    data_config = resolve_data_config(model=model)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    global_batch = args.batch_size * world_size
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / 256
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    train_loader, val_loader = _loaders(args, data_config, train_set, val_set, device, world_size > 1)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if amp else None
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    logger.info("%s: %d classes, %d training / %d validation images, global batch %d, lr %g, %d epochs, "
                "%d iterations per epoch", args.model, len(classes), len(train_set), len(val_set), global_batch,
                lr, num_epochs, len(train_loader))

    last, best_path = os.path.join(args.output, "last.pth"), os.path.join(args.output, "best.pth")
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    start_epoch, best_top1 = 0, -1.0
    if args.resume and os.path.isfile(last):
        ckpt = load_torch_weights(last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_top1 = ckpt["epoch"], ckpt["best_top1"]
        logger.info("resumed from %s: epoch %d of %d done, best top-1 %.2f", last, start_epoch, num_epochs, best_top1)
    elif args.resume:
        logger.info("--resume: no %s yet, starting from scratch", last)
    records = _metrics_before(metrics_path, start_epoch)
    if rank == 0:
        _write_metrics(metrics_path, records)

    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    state = {"num_epochs": num_epochs, "updates": start_epoch * len(train_loader)}
    end_epoch = num_epochs if args.max_epochs is None else min(num_epochs, args.max_epochs)
    record = records[-1] if records else {}
    for epoch in range(start_epoch, end_epoch):
        state["epoch"] = epoch
        _seed_epoch(args.seed, epoch, rank)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        loss, last_lr, liveness = _train_one_epoch(train_model, train_loader, criterion, optimizer, scheduler,
                                                   scaler, ema, state, args, device)
        record = {"epoch": epoch, "train_loss": loss, "lr": last_lr, **evaluate(model, val_loader, device, amp),
                  **liveness_scalars(liveness)}
        dead = dead_layers_message(liveness)
        if dead:
            logger.warning("Epoch %d: %s", epoch + 1, dead)
        if ema is not None:
            record.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, device, amp).items()})
        record["seconds"] = round(time.perf_counter() - start, 1)
        top1 = record["ema_top1" if ema is not None else "top1"]
        logger.info("epoch %d/%d: %s", epoch + 1, num_epochs, json.dumps(record))
        is_best = top1 > best_top1
        best_top1 = max(best_top1, top1)
        if rank == 0:
            records.append(record)
            ckpt = {
                "epoch": epoch + 1, "best_top1": best_top1, "top1": top1, "model_name": args.model,
                "model_kwargs": kwargs, "architecture": model.architecture, "num_classes": len(classes),
                "class_names": classes, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in data_config.items()},
                "seed": args.seed, "args": vars(args), "model": model.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            _save(last, ckpt)
            if is_best:
                _save(best_path, ckpt)
            _write_metrics(metrics_path, records)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return record
