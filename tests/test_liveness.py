"""Every attention parameter learns with the shipped defaults: YAML and LazyConfig detectors, the timm
classifiers, under the norms users pick; and the liveness report of training and of a checkpoint."""
import glob
import json
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from aa_detection.modeling.liveness import AttentionProbe, dead_layers_message, stage_summary  # noqa: E402
from common import CONFIG_DIR, TINY_SYNTHETIC, imagenet_like_frozen_bn, load_tool  # noqa: E402

AA_YAML = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*AA_R_*.yaml"), recursive=True))
AA_LAZY = sorted(glob.glob(os.path.join(CONFIG_DIR, "lazy", "*AA_R_*.py")))
SLOW_DEPTH = "R_101"  # builds of 101 layers: in the slow set


def _param(path):
    marks = [pytest.mark.slow] if SLOW_DEPTH in path else []
    return pytest.param(path, id=os.path.relpath(path, CONFIG_DIR), marks=marks)


def _images(size=(200, 249)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 180.0], [100.0, 30.0, 240.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    masks = torch.zeros(2, *size, dtype=torch.bool)  # for Mask R-CNN: the boxes filled
    for mask, (x0, y0, x1, y1) in zip(masks, inst.gt_boxes.tensor.int().tolist()):
        mask[y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return [{"image": torch.rand(3, *size) * 255, "instances": inst} for _ in range(2)]


def assert_every_attention_parameter_learns(model, step):
    """`step()` runs a forward pass; its loss's gradient reaches every row of each AAConv2d's qkv and
    attn_out and each relative table, and the probe finds every attention channel alive."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AAConv2d)}
    assert layers
    probe = AttentionProbe(model)
    with probe:
        step().backward()
    for name, layer in layers.items():
        for part in (layer.qkv, layer.attn_out):
            rows = part.weight.grad.flatten(1).abs().sum(dim=1)
            assert (rows > 0).all(), f"{name}: {int((rows == 0).sum())} of {len(rows)} rows get no gradient"
        for table in (layer.rel_h, layer.rel_w):
            assert table.grad is not None and table.grad.abs().sum() > 0, name
    assert dead_layers_message(probe.report()) == ""


def _detector_step(model):
    def step():
        with EventStorage():
            return sum(model(_images()).values())
    return step


@pytest.mark.parametrize("config", [_param(p) for p in AA_YAML])
def test_yaml_config_trains_every_attention_parameter(config):
    """One training step of each shipped AA config; the COCO configs (FrozenBN, ImageNet weights) with
    ImageNet-like frozen statistics rather than fresh ones."""
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    if cfg.MODEL.RESNETS.NORM == "FrozenBN":
        assert imagenet_like_frozen_bn(model, _images()) > 0
    assert_every_attention_parameter_learns(model.train(), _detector_step(model))


@pytest.mark.parametrize("config", [_param(p) for p in AA_LAZY])
def test_lazy_config_trains_every_attention_parameter(config):
    model = instantiate(LazyConfig.load(config).model)
    if any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()):
        imagenet_like_frozen_bn(model, _images())
    assert_every_attention_parameter_learns(model.train(), _detector_step(model))


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "GN", "FrozenBN"])
def test_block_norms_users_pick_train_every_attention_parameter(norm):
    """The COCO AA-R-50 with each block norm detectron2 offers (MODEL.RESNETS.NORM), defaults otherwise."""
    cfg = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_50_FPN_1x.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", norm])
    model = build_model(cfg)
    if norm == "FrozenBN":
        imagenet_like_frozen_bn(model, _images())
    assert_every_attention_parameter_learns(model.train(), _detector_step(model))


@pytest.mark.parametrize("name", ["aa_resnet18", "aa_resnet50"])
def test_timm_classifier_trains_every_attention_parameter(name):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    import aa_detection.pretraining.classifiers  # noqa: F401

    model = timm.create_model(name, num_classes=5).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    assert_every_attention_parameter_learns(model, lambda: torch.nn.functional.cross_entropy(model(x), y))


def test_attention_probe_finds_dead_channels():
    """A layer whose attention channels a frozen norm maps to a constant: every channel reported dead, by
    name; the same layer with a trained norm: all alive, with the output ratio of the branches."""
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, norm=torch.nn.BatchNorm2d(16))
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.randn(2, 8, 6, 7)
    probe = AttentionProbe(model)
    with probe:
        model(x).sum().backward()
    report = probe.report()
    assert report["0"].alive == report["0"].channels == 4 and report["0"].attention_to_conv > 0
    torch.nn.init.zeros_(layer.attn_out.weight)
    torch.nn.init.zeros_(layer.attn_out.bias)  # the attention channels are 0, BN maps them to 0, ReLU stops them
    model.zero_grad()
    with probe:
        model(x).sum().backward()
    report = probe.report()
    assert report["0"].alive == 0
    assert "0 (4 of 4 channels)" in dead_layers_message(report)
    assert stage_summary(report) == {"0": {"alive": 0.0, "attention_to_conv": 0.0}}


@pytest.mark.slow
def test_short_training_of_the_synthetic_config_moves_every_attention_row(tiny_synthetic, tmp_path):
    """tools/train_net.py's Trainer on the shipped synthetic AA config (a short schedule on the small
    generated set): every row of every attn_out moved, and metrics.json reports every stage alive."""
    from aa_detection.engine.trainer import Trainer

    config = os.path.join(CONFIG_DIR, "synthetic", "retinanet_AA_R_18_FPN_synthetic.yaml")
    cfg = setup_cfg(config, ["DATASETS.SYNTHETIC.ROOT", tiny_synthetic, "DATASETS.SYNTHETIC.NUM_TRAIN",
                             str(TINY_SYNTHETIC["num_train"]), "DATASETS.SYNTHETIC.NUM_VAL",
                             str(TINY_SYNTHETIC["num_val"]), "SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "5",
                             "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)],
                    prepare_data=True)
    trainer = Trainer(cfg)
    start = {n: m.attn_out.weight.detach().clone() for n, m in trainer.model.named_modules()
             if isinstance(m, AAConv2d)}
    trainer.train()
    for name, m in trainer.model.named_modules():
        if isinstance(m, AAConv2d):
            moved = (m.attn_out.weight.detach() - start[name]).flatten(1).abs().sum(dim=1)
            assert (moved > 0).all(), f"{name}: {int((moved == 0).sum())} attn_out rows never moved"
    records = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    alive = {k: r[k] for r in records for k in r if k.endswith("/alive")}
    assert set(alive) == {f"attention/{s}/alive" for s in ("res3", "res4", "res5")}
    assert all(v == 1.0 for v in alive.values()), alive


@pytest.mark.slow
def test_analyze_model_reports_liveness_of_a_checkpoint(tiny_synthetic, tmp_path, capsys):
    """tools/analyze_model.py --liveness on a checkpoint: a line per AA layer and per stage."""
    config = os.path.join(CONFIG_DIR, "synthetic", "retinanet_AA_R_18_FPN_synthetic.yaml")
    data = ["DATASETS.SYNTHETIC.ROOT", tiny_synthetic, "DATASETS.SYNTHETIC.NUM_TRAIN",
            str(TINY_SYNTHETIC["num_train"]), "DATASETS.SYNTHETIC.NUM_VAL", str(TINY_SYNTHETIC["num_val"])]
    cfg = setup_cfg(config, data)
    model = build_model(cfg)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    load_tool("analyze_model").main(["--config-file", config, "--liveness", *data, "MODEL.WEIGHTS", weights])
    out = capsys.readouterr().out
    for stage in ("res3", "res4", "res5"):
        assert f"{stage}" in out
    assert "res3.0.conv1" in out and "dead" not in out
