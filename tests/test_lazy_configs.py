"""The LazyConfigs build the same models, schedules and optimizers as their YAML twins (both call aa_resnet with
explicit arguments), and tools/train_net.py trains and evaluates them as it does the YAML configs."""
import glob
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.engine.compare import read_metrics  # noqa: E402
from aa_detection.engine.trainer import Trainer, argument_parser, main  # noqa: E402
from aa_detection.errors import ConfigError  # noqa: E402
from common import CONFIG_DIR, ROOT  # noqa: E402

pytestmark = pytest.mark.slow  # RetinaNets built twice

LAZY = sorted(glob.glob(os.path.join(CONFIG_DIR, "lazy", "*.py")))


def _yaml_twin(lazy_file):
    name = os.path.basename(lazy_file).replace(".py", ".yaml")
    return os.path.join(CONFIG_DIR, "synthetic" if "synthetic" in name else "", name)


def _settings(model):
    """Every scalar or list setting stored on the model's modules, and the anchors."""
    found = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if OmegaConf.is_list(value):
                value = list(value)
            if isinstance(value, (bool, int, float, str, type(None))) or (
                    isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                if not key.startswith("_") and key != "training":
                    found[f"{name}.{key}"] = tuple(value) if isinstance(value, list) else value
    for name, module in model.named_modules():
        for level, anchors in enumerate(getattr(module, "cell_anchors", ())):
            found[f"{name}.anchors{level}"] = anchors  # compared with a tolerance: the YAML sizes are rounded
    return found


@pytest.mark.parametrize("lazy_file", LAZY, ids=os.path.basename)
def test_lazy_config_builds_its_yaml_twin(lazy_file):
    lazy = LazyConfig.load(lazy_file)
    cfg = setup_cfg(_yaml_twin(lazy_file), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    lazy_model = instantiate(lazy.model)
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    lazy_state, yaml_state = lazy_model.state_dict(), yaml_model.state_dict()
    assert list(lazy_state) == list(yaml_state)
    for key, value in lazy_state.items():  # the same modules built in the same order: the same weights
        assert torch.equal(value, yaml_state[key]), key
    lazy_settings, yaml_settings = _settings(lazy_model), _settings(yaml_model)
    assert set(lazy_settings) == set(yaml_settings)
    for key, value in lazy_settings.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, yaml_settings[key], atol=1e-3, rtol=0, msg=key)
        else:
            assert value == yaml_settings[key], key


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize("lazy_file", LAZY, ids=os.path.basename)
def test_lazy_config_trains_as_its_yaml_twin(lazy_file):
    """Schedule, optimizer and data settings of the twins agree."""
    lazy = LazyConfig.load(lazy_file)
    cfg = setup_cfg(_yaml_twin(lazy_file), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    schedule = instantiate(lazy.lr_multiplier)
    yaml_optimizer = Trainer.build_optimizer(cfg, torch.nn.Linear(2, 2))
    yaml_schedule = Trainer.build_lr_scheduler(cfg, yaml_optimizer)
    for it in range(cfg.SOLVER.MAX_ITER):
        lr = yaml_optimizer.param_groups[0]["lr"]
        assert cfg.SOLVER.BASE_LR * schedule(it / cfg.SOLVER.MAX_ITER) == pytest.approx(lr, rel=1e-6), it
        yaml_schedule.step()
    lazy.optimizer.params.model = torch.nn.Linear(2, 2)
    optimizer = instantiate(lazy.optimizer)
    # the same class (detectron2 names the clipping subclass after its base)
    assert type(optimizer).__name__ == type(yaml_optimizer).__name__
    assert type(optimizer).__mro__[1:] == type(yaml_optimizer).__mro__[1:]
    assert optimizer.defaults["lr"] == cfg.SOLVER.BASE_LR
    assert optimizer.defaults["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY
    if "synthetic" in lazy_file:
        train = lazy.dataloader.train
        assert train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH
        resize = train.mapper.augmentations[0]
        assert tuple(resize.short_edge_length) == tuple(cfg.INPUT.MIN_SIZE_TRAIN)
        assert resize.max_size == cfg.INPUT.MAX_SIZE_TRAIN
        assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD


def _lazy_args(lazy_file, data_root, out, *extra, flags=()):
    opts = [f"datasets.SYNTHETIC.ROOT={data_root}", "datasets.SYNTHETIC.NUM_TRAIN=32",
            "datasets.SYNTHETIC.NUM_VAL=6", "dataloader.train.mapper.augmentations.0.short_edge_length=[64,96]",
            "dataloader.train.mapper.augmentations.0.max_size=128",
            "dataloader.test.mapper.augmentations.0.short_edge_length=96",
            "dataloader.test.mapper.augmentations.0.max_size=128", "dataloader.train.total_batch_size=4",
            "dataloader.train.num_workers=0", "dataloader.test.num_workers=0", "optimizer.lr=0.01",
            "lr_multiplier.warmup_length=0.125", "lr_multiplier.scheduler.values=[1.0]",
            "lr_multiplier.scheduler.milestones=[40]",
            "train.max_iter=40", "train.eval_period=0", "train.checkpointer.period=20", "train.seed=1",
            f"train.output_dir={out}"] + list(extra)
    return argument_parser().parse_args(["--config-file", lazy_file, *flags, *opts])


def _yaml_args(yaml_file, data_root, out):
    opts = ["DATASETS.SYNTHETIC.ROOT", data_root, "DATASETS.SYNTHETIC.NUM_TRAIN", "32",
            "DATASETS.SYNTHETIC.NUM_VAL", "6", "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "4",
            "DATALOADER.NUM_WORKERS", "0", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "5",
            "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "40", "TEST.EVAL_PERIOD", "0",
            "SOLVER.CHECKPOINT_PERIOD", "20", "SEED", "1", "OUTPUT_DIR", str(out)]
    return argument_parser().parse_args(["--config-file", yaml_file, *opts])


def _metrics(out):
    return read_metrics(os.path.join(out, "metrics.json"))


SYNTHETIC_AA = os.path.join(CONFIG_DIR, "lazy", "retinanet_AA_R_18_FPN_synthetic.py")


def _train_net(args):
    """tools/train_net.py with `args` in a process of its own (two runs in one process may differ in float
    rounding: what the test compares is the run a user starts)."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", args.config_file, *args.opts]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)


def test_lazy_synthetic_run_matches_its_yaml_twin(tiny_synthetic, tmp_path):
    """tools/train_net.py trains and evaluates the AA LazyConfig: the same seed gives the YAML twin's run
    (losses, AP); --eval-only of its weights gives its AP; another config's folder is refused, also to
    --resume and --eval-only."""
    lazy_out, yaml_out = tmp_path / "lazy", tmp_path / "yaml"
    # the YAML twin sizes the relative tables from INPUT.MAX_SIZE_TRAIN, the LazyConfig says it
    _train_net(_lazy_args(SYNTHETIC_AA, tiny_synthetic, lazy_out, "model.backbone.bottom_up.max_input_size=128"))
    _train_net(_yaml_args(_yaml_twin(SYNTHETIC_AA), tiny_synthetic, yaml_out))

    for key in ("total_loss", "loss_cls", "loss_box_reg", "bbox/AP", "bbox/AP50"):
        lazy_values = [r[key] for r in _metrics(lazy_out) if key in r]
        assert lazy_values and lazy_values == pytest.approx([r[key] for r in _metrics(yaml_out) if key in r]), key
    losses = [r["total_loss"] for r in _metrics(lazy_out) if "total_loss" in r]
    assert len(losses) == 2 and losses[1] < 0.95 * losses[0], losses
    final = [r for r in _metrics(lazy_out) if "bbox/AP" in r]
    assert len(final) == 1 and final[0]["iteration"] == 40
    assert os.path.isfile(lazy_out / "model_final.pth") and os.path.isfile(lazy_out / "config.yaml")

    again = main(_lazy_args(SYNTHETIC_AA, tiny_synthetic, tmp_path / "eval", "model.backbone.bottom_up.max_input_size=128",
                            f"train.init_checkpoint={lazy_out / 'model_final.pth'}", flags=["--eval-only"]))
    assert again["bbox"]["AP"] == pytest.approx(final[0]["bbox/AP"], abs=1e-6)

    baseline = os.path.join(CONFIG_DIR, "lazy", "retinanet_R_18_FPN_synthetic.py")
    for flags in ([], ["--resume"], ["--eval-only"]):
        with pytest.raises(ConfigError, match="train.output_dir .* holds the run of another config"):
            main(_lazy_args(baseline, tiny_synthetic, lazy_out, flags=flags))


@pytest.mark.parametrize("name", ["mask_rcnn_AA_R_50_FPN_1x.py", "retinanet_AA_R_18_FPN_synthetic.py"])
def test_lazy_datasets_set_the_class_count_where_the_model_keeps_it(tiny_synthetic, name):
    """RetinaNet keeps it in model.num_classes, the R-CNNs in model.roi_heads.num_classes (its predictor and
    mask head read it from there)."""
    from aa_detection.data import SYNTHETIC_CLASSES
    from aa_detection.engine.lazy import prepare_lazy_datasets

    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "lazy", name))
    lazy.dataloader.train.dataset.names = "synthetic_train"
    lazy.dataloader.test.dataset.names = "synthetic_val"
    lazy.datasets = {"SYNTHETIC": {"ROOT": tiny_synthetic, "NUM_TRAIN": 32, "NUM_VAL": 6}}
    prepare_lazy_datasets(lazy)
    heads = lazy.model.roi_heads if "roi_heads" in lazy.model else lazy.model
    assert heads.num_classes == len(SYNTHETIC_CLASSES)
    model = instantiate(lazy.model)
    if "roi_heads" in lazy.model:
        assert model.roi_heads.box_predictor.cls_score.out_features == len(SYNTHETIC_CLASSES) + 1  # + background
    else:
        anchors = model.anchor_generator.num_cell_anchors[0]
        assert model.head.cls_score.out_channels == len(SYNTHETIC_CLASSES) * anchors
