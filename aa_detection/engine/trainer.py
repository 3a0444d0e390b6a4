"""The detectron2 trainer of the project, its command-line setup and its entry point.

`tools/train_net.py` is a thin wrapper around `argument_parser`, `main` and `launch_main` here.
Besides detectron2's usual outputs (checkpoints, `metrics.json`, `inference/`), every training or
`--eval-only` run writes `OUTPUT_DIR/eval_results.json` (atomically, main process only) with the COCO
metrics of each test dataset, the iteration, the model's parameters and GFLOPs, the inference time
per image and the training wall time.
"""
import argparse
import json
import logging
import os
import time
import weakref
from typing import Any, Dict, List, Optional

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import (
    AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_argument_parser,
    default_setup, hooks,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, JSONWriter
from detectron2.utils.logger import setup_logger

from ..checkpoint import AACheckpointer
from ..analysis import count_parameters, flop_count
from ..config import add_trust_config_argument, load_cfg, setup_cfg, validate_cfg
from ..data import prepare_datasets, register_datasets
from ..errors import ConfigError, launch_reporting_user_errors
from ..safe_io import atomic_write
from ..solver import adamw
from . import lazy
from .compare import RESULTS_FILE
from .distributed import ddp_model
from .liveness import AttentionLivenessHook
from .lazy import is_lazy_config
from .resilience import MetricsWriter, check_run_identity

__all__ = ["Trainer", "argument_parser", "setup", "main", "launch_main", "RESULTS_FILE",
           "inference_gflops", "inference_seconds_per_image"]

logger = logging.getLogger("aa_detection")


class Trainer(DefaultTrainer):
    """DefaultTrainer with the project's checkpointer, the COCO box evaluator, CPU multi-process training,
    a repairable metrics.json, and the results and wall time of its evaluations.

    Attributes beyond DefaultTrainer's:
        eval_results: the results of the latest evaluation during `train` (None before the first);
            on processes other than the main one an empty dict.
        eval_seconds: wall time spent in those evaluations.
        metrics_writer: the MetricsWriter of OUTPUT_DIR/metrics.json (main process; None elsewhere).

    detectron2's TEST.EXPECTED_RESULTS check (DefaultTrainer.train) is not supported: it reads the
    results DefaultTrainer's own EvalHook keeps, and `evaluate` replaces that hook's function.
    """

    def __init__(self, cfg):
        """DefaultTrainer.__init__, with the two things it hard-codes replaced:

        - the checkpointer is an AACheckpointer (`AACheckpointer.from_config`) instead of a DetectionCheckpointer;
        - a CPU model of a multi-process run is wrapped in DistributedDataParallel with
          `device_ids=None` (`ddp_model`), and DefaultTrainer offers no hook for it.
          tests/test_train_net.py checks that this constructor sets every attribute DefaultTrainer's sets.
        """
        TrainerBase.__init__(self)
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AACheckpointer.from_config(model, cfg, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.eval_results = None
        self.eval_seconds = 0.0
        self.metrics_writer = None
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> List[hooks.HookBase]:
        """DefaultTrainer's hooks, its EvalHook evaluating through `evaluate` (same period), after an
        AttentionLivenessHook measuring the step before each evaluation."""
        built = []
        for h in super().build_hooks():
            if isinstance(h, hooks.EvalHook):
                h = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate)
                built.append(AttentionLivenessHook(self.cfg.TEST.EVAL_PERIOD))
            built.append(h)
        return built

    def evaluate(self) -> dict:
        """`test` on the current model, keeping its results in `eval_results` and adding its wall time
        to `eval_seconds`."""
        start = time.perf_counter()
        self.eval_results = self.test(self.cfg, self.model)
        self.eval_seconds += time.perf_counter() - start
        return self.eval_results

    def build_writers(self) -> List[EventWriter]:
        """detectron2's writers, metrics.json written by a MetricsWriter (repairable on resume)."""
        writers = super().build_writers()
        for i, writer in enumerate(writers):
            if type(writer) is JSONWriter:
                writer.close()
                self.metrics_writer = writers[i] = MetricsWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))
        return writers

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's resume_or_load, after removing partial files of a killed checkpoint save, and
        followed by the repair of metrics.json (records from `start_iter` on are dropped on resume)."""
        if comm.is_main_process():
            self.checkpointer.remove_partial_files()
        super().resume_or_load(resume=resume)
        if self.metrics_writer is not None:
            self.metrics_writer.repair(keep_before=self.start_iter if resume else None)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """detectron2's SGD, or AdamW (SOLVER.OPTIMIZER)."""
        if cfg.SOLVER.OPTIMIZER.upper() == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER.upper() != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER must be SGD or ADAMW, got {cfg.SOLVER.OPTIMIZER}")
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        return adamw(params, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, dict(cfg.SOLVER.CLIP_GRADIENTS))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
        """The evaluator of the dataset's `evaluator_type` metadata: "coco" (also when unset), "lvis" (boxes,
        and masks with MODEL.MASK_ON) or "pascal_voc" (boxes); ConfigError naming the dataset for another type."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
        if evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ConfigError(f"DATASETS.TEST: dataset '{dataset_name}' has evaluator_type {evaluator_type!r}, which has "
                          "no box evaluator here: allowed values are 'coco', 'lvis' and 'pascal_voc'")


def inference_gflops(cfg: CfgNode, model: torch.nn.Module) -> float:
    """GFLOPs of `model` on the first image of the first test dataset.

    GFLOPs count one fused multiply-add as one FLOP (fvcore's convention, the papers' one), attention
    cores included (`aa_detection.analysis.flop_count`).
    """
    inputs = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    was_training = model.training
    model.eval()
    flops, _ = flop_count(model, (inputs,))
    model.train(was_training)
    return flops / 1e9


def inference_seconds_per_image(cfg: CfgNode, model: torch.nn.Module, num_images: int = 30, warmup: int = 3) -> float:
    """Mean wall time of the model's forward pass (batch 1, no data loading) on test images."""
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= num_images + warmup:
                break
            start = time.perf_counter()
            model(inputs)
            if i >= warmup:
                total += time.perf_counter() - start
                count += 1
    model.train(was_training)
    return total / max(count, 1)


def save_results(cfg: CfgNode, model: torch.nn.Module, results: Optional[Dict], iteration: Optional[int],
                 train_seconds: Optional[float] = None, wall_seconds: Optional[float] = None,
                 config_file: Optional[str] = None) -> Optional[dict]:
    """Write OUTPUT_DIR/eval_results.json; call on every process, only the main one writes."""
    if not comm.is_main_process():
        return None
    model = model.module if hasattr(model, "module") else model
    results = dict(results or {})
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}  # DefaultTrainer.test unwraps a single dataset
    gflops = seconds_per_image = None  # without test images there is nothing to measure on
    if cfg.DATASETS.TEST:
        gflops, seconds_per_image = inference_gflops(cfg, model), inference_seconds_per_image(cfg, model)
    data = {
        "config_file": config_file,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "iteration": iteration,
        "results": {k: {t: dict(m) for t, m in v.items()} for k, v in results.items()},
        "params": count_parameters(model)["total"],
        "gflops": gflops,
        "seconds_per_image": seconds_per_image,
        "train_seconds": train_seconds,  # training wall time without the periodic evaluations
        "train_wall_seconds": wall_seconds,  # with them
    }
    with atomic_write(os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE), "w") as f:
        json.dump(data, f, indent=2)
    logger.info("wrote %s", os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE))
    return data


def argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (repeatable); name it in DATASETS.TRAIN / DATASETS.TEST")
    add_trust_config_argument(parser)
    return parser


def _run_identity(node: dict, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of a config's MODEL leaves (weights and device aside) and DATASETS.TRAIN."""
    if not prefix:
        leaves = _run_identity(node.get("MODEL", {}), "MODEL.")
        leaves["DATASETS.TRAIN"] = list(node.get("DATASETS", {}).get("TRAIN", []))
        return leaves
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict):
            leaves.update(_run_identity(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in ("MODEL.WEIGHTS", "MODEL.DEVICE"):
            leaves[f"{prefix}{key}"] = value
    return leaves


def check_output_dir(cfg: CfgNode) -> None:
    """ConfigError when cfg.OUTPUT_DIR holds the run of another model: its config.yaml (written at every
    start) differs in MODEL (weights and device aside) or DATASETS.TRAIN."""
    check_run_identity("OUTPUT_DIR", cfg.OUTPUT_DIR, _run_identity, lambda: yaml.safe_load(cfg.dump()))


def setup(args: argparse.Namespace) -> CfgNode:
    """The frozen config of a training or evaluation run: `aa_detection.config.setup_cfg`'s steps, with the
    datasets prepared (synthetic data generated if missing, datasets checked) once logging is set up.
    A run never starts in the OUTPUT_DIR of another config's run (`check_output_dir`)."""
    cfg, origins = load_cfg(args.config_file, args.opts, datasets=args.dataset, trusted=args.trust_config)
    validate_cfg(cfg, origins)
    # the project's own messages (dataset checks, metrics repair) to the console and OUTPUT_DIR/log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="aa_detection", abbrev_name="aa")
    prepare_datasets(cfg)
    register_datasets(cfg)
    check_output_dir(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args: argparse.Namespace) -> Optional[dict]:
    """Train, or with `--eval-only` evaluate, the config of `args`; a `.py` config is a LazyConfig
    (`aa_detection.engine.lazy`)."""
    if is_lazy_config(args.config_file):
        return lazy.main(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = AACheckpointer.from_config(model, cfg, cfg.OUTPUT_DIR)
        checkpoint = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        iteration = checkpoint.get("iteration")
        save_results(cfg, model, results, None if iteration is None else iteration + 1,
                     config_file=args.config_file)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    start = time.perf_counter()
    try:
        trainer.train()
    except FloatingPointError as e:
        last = trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else None
        raise FloatingPointError(
            f"{e}\nTraining stopped. The last good checkpoint is {last or '(none saved yet)'}; lower "
            "SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS before resuming (--resume).") from e
    wall_seconds = time.perf_counter() - start
    # the EvalHook has evaluated the final model: complete results on the main process, empty dicts on
    # the others (save_results writes on the main process only)
    save_results(cfg, trainer.model, trainer.eval_results, trainer.iter, wall_seconds - trainer.eval_seconds,
                 wall_seconds, config_file=args.config_file)
    return trainer.eval_results


def launch_main(args: argparse.Namespace) -> None:
    """`main` in `--num-gpus` processes per machine. With several, the config and the datasets are
    checked here first, so a user error is reported once before any worker starts (the workers then
    read the cached dataset checks), and one raised later in a worker is raised here, once."""
    if args.num_gpus * args.num_machines > 1:
        setup_logger(name="aa_detection", abbrev_name="aa")
        if is_lazy_config(args.config_file):
            lazy.prepare_lazy_datasets(lazy.load_lazy_config(args.config_file, args.opts), args.dataset)
        else:
            setup_cfg(args.config_file, args.opts, datasets=args.dataset, prepare_data=True,
                      trusted=args.trust_config)
    launch_reporting_user_errors(main, args.num_gpus, num_machines=args.num_machines,
                                 machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
