"""Training and evaluation of LazyConfigs, the Python configs of detectron2's `configs/new_baselines`.

`tools/train_net.py --config-file CONFIG.py` comes here, with the flags of a YAML run (`--eval-only`,
`--resume`, `--num-gpus`, `--dataset`); overrides are detectron2's `key=value` (`train.max_iter=100`).

- Datasets: the names in `dataloader.train.dataset.names` and `dataloader.test.dataset.names` are
  prepared and registered as the YAML configs' DATASETS.TRAIN / TEST are (synthetic data generated,
  COCO-format datasets checked), with the project's other DATASETS keys (REGISTER, SYNTHETIC, the image
  checks) taken from an optional top-level `datasets` dict of the config; `model.num_classes` follows the
  training datasets' classes.
- Training: detectron2's SimpleTrainer (AMPTrainer with `train.amp.enabled`) with the project's
  checkpointer (pretrained-weight loading, atomic checkpoints) and repairable metrics.json, evaluating
  every `train.eval_period` iterations and at the end; `train.seed` is the run's seed.
- A run never starts in the `train.output_dir` of another config's run (`check_output_dir`).
"""
import argparse
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional

from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import AACheckpointer
from ..config import load_cfg
from ..data import prepare_datasets, register_datasets
from ..errors import ConfigError
from ..safe_io import load_yaml_data
from .distributed import ddp_model
from .liveness import AttentionLivenessHook
from .resilience import MetricsWriter, check_run_identity

__all__ = ["is_lazy_config", "load_lazy_config", "prepare_lazy_datasets", "setup", "train_loader", "evaluate", "main"]

logger = logging.getLogger("aa_detection")


def is_lazy_config(config_file: Optional[str]) -> bool:
    return bool(config_file) and config_file.endswith(".py")


def load_lazy_config(config_file: str, opts: List[str]) -> DictConfig:
    """The LazyConfig of `config_file` with detectron2's `key=value` overrides applied; ConfigError naming
    the file, or the override, that fails."""
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file}: no such file")
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as e:
        raise ConfigError(f"{config_file}: cannot be loaded as a LazyConfig: {type(e).__name__}: {e}") from e
    for override in opts:
        if "=" not in override:
            raise ConfigError(f"{config_file}: override {override!r} is not key=value (a LazyConfig takes "
                              "detectron2's key=value overrides, e.g. train.max_iter=100)")
        try:
            cfg = LazyConfig.apply_overrides(cfg, [override])
        except Exception as e:
            raise ConfigError(f"{config_file}: override {override!r}: {type(e).__name__}: {e}") from e
    return cfg


def _names(node: DictConfig) -> List[str]:
    names = node.dataset.names
    return [names] if isinstance(names, str) else list(names)


def prepare_lazy_datasets(cfg: DictConfig, extra_datasets=()) -> None:
    """Prepare and register the datasets of `cfg.dataloader` as `tools/train_net.py` does for a YAML config,
    and set the model's class count (`cfg.model.num_classes` of RetinaNet, `cfg.model.roi_heads.num_classes`
    of the R-CNNs) from the training datasets' classes. `extra_datasets`: the (name, json_file, image_root)
    triples of `--dataset`."""
    heads = cfg.model if "num_classes" in cfg.model else cfg.model.roi_heads
    datasets = OmegaConf.to_container(cfg.datasets) if "datasets" in cfg else {}
    opts: List[Any] = []
    for key, value in _flatten(datasets):
        opts += [f"DATASETS.{key}", value]
    opts += ["DATASETS.TRAIN", tuple(_names(cfg.dataloader.train)),
             "DATASETS.TEST", tuple(_names(cfg.dataloader.test)) if "test" in cfg.dataloader else (),
             "MODEL.RETINANET.NUM_CLASSES", heads.num_classes]
    data_cfg, _ = load_cfg(None, opts, datasets=extra_datasets)
    prepare_datasets(data_cfg)
    register_datasets(data_cfg)
    heads.num_classes = data_cfg.MODEL.RETINANET.NUM_CLASSES


def _flatten(node: Dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _run_identity(config: dict) -> dict:
    """A LazyConfig's `model` and training dataset names."""
    names = ((config.get("dataloader") or {}).get("train") or {}).get("dataset", {}).get("names")
    return {"model": config.get("model"), "dataloader.train.dataset.names": [names] if isinstance(names, str) else names}


def check_output_dir(cfg: DictConfig) -> None:
    """ConfigError when `train.output_dir` holds the run of another config: its config.yaml differs in
    `model` or in the training datasets."""
    def current() -> dict:
        with tempfile.TemporaryDirectory() as tmp:  # this config as its config.yaml would be written
            LazyConfig.save(cfg, os.path.join(tmp, "config.yaml"))
            return load_yaml_data(os.path.join(tmp, "config.yaml"))

    check_run_identity("train.output_dir", cfg.train.output_dir, _run_identity, current)


def setup(args: argparse.Namespace) -> DictConfig:
    """The LazyConfig of a run: loaded with its overrides, datasets prepared, detectron2's `default_setup`
    (logging, config.yaml, seed) done. A run never starts in the output_dir of another config's run
    (`check_output_dir`)."""
    cfg = load_lazy_config(args.config_file, args.opts)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="aa_detection", abbrev_name="aa")
    prepare_lazy_datasets(cfg, args.dataset)
    check_output_dir(cfg)
    default_setup(cfg, args)
    return cfg


def evaluate(cfg: DictConfig, model) -> dict:
    """The results of `cfg.dataloader.evaluator` on `cfg.dataloader.test` ({} without them)."""
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def train_loader(cfg: DictConfig):
    """`cfg.dataloader.train` instantiated. A `build_detection_train_loader` without a sampler of its own
    gets detectron2's TrainingSampler seeded with `train.seed`, as detectron2 seeds the sampler of a YAML
    run with SEED: the same seed, the same batches."""
    node, seed = cfg.dataloader.train, cfg.train.get("seed", -1)
    target = locate(node._target_) if isinstance(node._target_, str) else node._target_
    if target is not build_detection_train_loader or node.get("sampler") is not None or seed is None or seed < 0:
        return instantiate(node)
    dataset = instantiate(node.dataset)
    kwargs = {key: instantiate(value) for key, value in node.items() if key not in ("_target_", "dataset")}
    return build_detection_train_loader(dataset=dataset, sampler=TrainingSampler(len(dataset), seed=seed), **kwargs)


def _train(args: argparse.Namespace, cfg: DictConfig) -> dict:
    model = instantiate(cfg.model).to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader(cfg), optimizer)
    checkpointer = AACheckpointer(model, cfg.train.output_dir, trainer=trainer)
    writers = None
    if comm.is_main_process():
        metrics = MetricsWriter(os.path.join(cfg.train.output_dir, "metrics.json"))
        writers = [CommonMetricPrinter(cfg.train.max_iter), metrics, TensorboardXWriter(cfg.train.output_dir)]
    results = {}

    def test():
        results.update(evaluate(cfg, model))
        return results

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if writers else None,
        AttentionLivenessHook(cfg.train.eval_period),
        hooks.EvalHook(cfg.train.eval_period, test),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if writers else None,
    ])
    if writers:
        checkpointer.remove_partial_files()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if writers:
        metrics.repair(keep_before=start_iter if args.resume else None)
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def main(args: argparse.Namespace) -> dict:
    """Train (or with `--eval-only` evaluate `train.init_checkpoint`) the LazyConfig `args.config_file`;
    returns the last evaluation's results."""
    cfg = setup(args)
    if not args.eval_only:
        return _train(args, cfg)
    model = instantiate(cfg.model).to(cfg.train.device)
    AACheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    return evaluate(cfg, model)
