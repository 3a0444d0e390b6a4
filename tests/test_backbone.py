import functools
import math
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone import build_resnet_backbone  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from aa_detection.checkpoint import pretrained_shapes  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from aa_detection.layers import flex, relative_attention as ra  # noqa: E402
from aa_detection.modeling import AABasicBlock, AABottleneckBlock, build_aa_resnet_backbone  # noqa: E402

from common import CONFIG_DIR, imagenet_like_frozen_bn  # noqa: E402

ALL_OUT = ["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"]
ATTENTION = ("qkv", "attn_out", "attention_norm", "rel_h", "rel_w")


def _is_attention(key):
    return any(f".{name}" in key for name in ATTENTION)


def test_both_builders_are_registered():
    for name in ("build_aa_resnet_backbone", "build_retinanet_aa_resnet_fpn_backbone"):
        assert name in BACKBONE_REGISTRY


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_names_match_detectron2_resnet(depth, stride_in_1x1):
    cfg = setup_cfg(None, ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)]
                    + ALL_OUT + (["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"] if depth < 50 else []))
    plain = build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    model = build_aa_resnet_backbone(cfg, ShapeSpec(channels=3))
    aa = model.state_dict()
    assert {k for k in aa if not _is_attention(k)} == set(plain)
    assert all(_is_attention(k) for k in set(aa) - set(plain))
    narrower = {key for key, value in plain.items() if aa[key].shape != value.shape}
    # the conv branch of augmented convolutions and, under FrozenBN, its norm; checkpoints widen them back
    assert narrower == set(pretrained_shapes(model))
    for key in narrower:
        assert key.split(".")[0] in ("res3", "res4", "res5")
        assert tuple(plain[key].shape) == pretrained_shapes(model)[key]
        assert aa[key].shape[1:] == plain[key].shape[1:] and aa[key].shape[0] < plain[key].shape[0]


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_augmented_convolutions_and_output_shape(depth, stride_in_1x1):
    opts = ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)] + ALL_OUT
    if depth < 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    model = build_aa_resnet_backbone(setup_cfg(None, opts), ShapeSpec(channels=3)).eval()
    for name in ("res2", "res3", "res4", "res5"):
        for block in getattr(model, name):
            augmented = name != "res2"
            if depth < 50:
                assert isinstance(block, AABasicBlock) == augmented
                assert isinstance(block.conv1, AAConv2d) == augmented  # both 3x3 convolutions
                assert isinstance(block.conv2, AAConv2d) == augmented
            else:
                assert isinstance(block, AABottleneckBlock) == augmented
                assert isinstance(block.conv2, AAConv2d) == augmented  # the 3x3 convolution only
                assert not isinstance(block.conv1, AAConv2d) and not isinstance(block.conv3, AAConv2d)
            if augmented:
                assert isinstance(block.conv2.norm, FrozenBatchNorm2d)  # MODEL.RESNETS.NORM, convolution channels
    for size in [(67, 93), (1, 33)]:
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        for name, spec in model.output_shape().items():
            assert out[name].shape == (1, spec.channels, math.ceil(size[0] / spec.stride),
                                       math.ceil(size[1] / spec.stride)), (name, size)


def test_freeze_at_and_stage_selection():
    cfg = setup_cfg(None, ["MODEL.BACKBONE.FREEZE_AT", "3", "MODEL.AA.STAGES", "['res4']",
                           "MODEL.RESNETS.NORM", "BN"] + ALL_OUT)
    model = build_aa_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert not any(isinstance(m, AAConv2d) for m in list(model.res3.modules()) + list(model.res5.modules()))
    assert all(isinstance(b.conv2, AAConv2d) for b in model.res4)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in ("res4", "res5")), name
    assert isinstance(model.res4[0].conv2.norm, torch.nn.BatchNorm2d)


def test_frozen_attention_is_refused_naming_both_keys():
    cfg = setup_cfg(None, ["MODEL.BACKBONE.FREEZE_AT", "3", "MODEL.AA.STAGES", "['res3', 'res5']"] + ALL_OUT)
    with pytest.raises(ValueError, match=r"MODEL\.AA\.STAGES.*res3.*MODEL\.BACKBONE\.FREEZE_AT.*3"):
        build_aa_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_attention_norm_under_frozen_and_trained_block_norms():
    """Under FrozenBN (the COCO configs) the attention channels get a trained BN of their own and the
    convolution channels keep FrozenBN; a trained block norm covers the concatenation; MODEL.AA.NORM names
    the attention channels' norm; MODEL.AA.ATTENTION_GAIN is their norm's initial weight."""
    model = build_aa_resnet_backbone(setup_cfg(None, ALL_OUT), ShapeSpec(channels=3))
    for block in model.res4:
        conv2 = block.conv2
        assert isinstance(conv2.norm, FrozenBatchNorm2d) and isinstance(conv2.attention_norm, torch.nn.BatchNorm2d)
        assert conv2.norm.weight.numel() == conv2.out_channels - conv2.value_depth
        assert torch.equal(conv2.attention_norm.weight, torch.ones(conv2.value_depth))
        assert isinstance(block.conv1.norm, FrozenBatchNorm2d) and isinstance(block.conv3.norm, FrozenBatchNorm2d)
    assert isinstance(model.res2[0].conv2.norm, FrozenBatchNorm2d)
    trained = build_aa_resnet_backbone(setup_cfg(None, ["MODEL.RESNETS.NORM", "BN", "MODEL.AA.ATTENTION_GAIN", "0.5"]
                                                 + ALL_OUT), ShapeSpec(channels=3))
    conv2 = trained.res4[0].conv2
    assert conv2.attention_norm is None and conv2.norm.weight.numel() == conv2.out_channels
    assert torch.equal(conv2.norm.weight[-conv2.value_depth:], torch.full((conv2.value_depth,), 0.5))
    assert torch.equal(conv2.norm.weight[:-conv2.value_depth], torch.ones(conv2.out_channels - conv2.value_depth))
    named = build_aa_resnet_backbone(setup_cfg(None, ["MODEL.AA.NORM", "SyncBN"] + ALL_OUT), ShapeSpec(channels=3))
    assert isinstance(named.res5[0].conv2.attention_norm, torch.nn.SyncBatchNorm)


def test_grouped_convolutions_are_refused_in_augmented_stages():
    cfg = setup_cfg(None, ["MODEL.RESNETS.NUM_GROUPS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "4"])
    with pytest.raises(ValueError, match="NUM_GROUPS"):
        build_aa_resnet_backbone(cfg, ShapeSpec(channels=3))


def _retinanet(train, opts=()):
    cfg = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_50_FPN_1x.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    model = build_model(cfg)
    return model.train(train), cfg


def test_fpn_output_shape_matches_outputs():
    model, _ = _retinanet(False)
    x = torch.randn(1, 3, 224, 256)  # RetinaNet pads images to a multiple of 32 before the backbone
    with torch.no_grad():
        feats = model.backbone(x)
    shapes = model.backbone.output_shape()
    assert set(feats) == set(shapes) == {"p3", "p4", "p5", "p6", "p7"}
    for name, spec in shapes.items():
        assert feats[name].shape == (1, spec.channels, math.ceil(224 / spec.stride), math.ceil(256 / spec.stride))


@pytest.mark.slow
def test_backbone_on_compiled_flex_matches_naive_over_multi_scale_batches(aot_eager_flex, monkeypatch):
    """AA-R50's backbone (res3-res5) on the CUDA path, compiled FlexAttention (torch.compile's front end,
    aot_eager standing in for Inductor): its FPN features equal the naive path's on six batches of other
    sizes and batch sizes, with at most three compiled graphs for all its attention layers."""
    _, counter = aot_eager_flex
    monkeypatch.setitem(ra.PATHS, "flex", functools.partial(flex.attend, compiled=True))  # as on CUDA
    model, _ = _retinanet(False, ["MODEL.AA.IMPL", "flex"])
    naive, _ = _retinanet(False, ["MODEL.AA.IMPL", "naive"])
    naive.load_state_dict(model.state_dict())
    for batch, height, width in [(1, 320, 480), (1, 352, 512), (2, 384, 448), (1, 416, 544), (2, 288, 640),
                                 (1, 448, 576)]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            feats, ref = model.backbone(x), naive.backbone(x)
        for name in ref:
            assert (feats[name] - ref[name]).abs().max() < 1e-4 * ref[name].abs().max(), (height, width, name)
    assert counter.frame_count <= 3


def test_retinanet_inference_on_odd_size():
    model, _ = _retinanet(False)
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 200, 249) * 255, "height": 200, "width": 249}])
    inst = out[0]["instances"]
    assert inst.image_size == (200, 249) and len(inst) > 0
    assert torch.isfinite(inst.pred_boxes.tensor).all()


@pytest.mark.parametrize("with_instances", [True, False])
def test_retinanet_training_step_reaches_attention(with_instances):
    # The shipped config, its FrozenBN holding statistics like ImageNet weights' (identity statistics would
    # let random activations grow through 50 layers until the res5 softmax saturates).
    model, cfg = _retinanet(True)
    imagenet_like_frozen_bn(model, [{"image": torch.rand(3, 200, 249) * 255}])
    inst = Instances((200, 249))
    if with_instances:
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 180.0], [100.0, 30.0, 240.0, 90.0]]))
        inst.gt_classes = torch.tensor([3, 17])
    else:
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.long)
    with EventStorage():
        losses = model([{"image": torch.rand(3, 200, 249) * 255, "instances": inst}])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    attention = {n: p for n, p in model.named_parameters() if _is_attention(n)}
    assert attention
    for stage in ("res3", "res4", "res5"):
        names = [n for n in attention if f".{stage}." in n]
        assert {n.split(".")[-2] if "rel_" not in n else n.split(".")[-1] for n in names} >= set(ATTENTION)
        for n in names:
            assert attention[n].grad is not None and attention[n].grad.abs().sum() > 0, n


def test_an_attention_norm_that_cannot_take_the_channels_is_a_config_error_naming_the_keys():
    from aa_detection.errors import ConfigError

    with pytest.raises(ConfigError, match=r"MODEL\.AA\.NORM='GN'.*16 attention.*MODEL\.AA\.NORM from command-line"):
        setup_cfg(None, ["MODEL.BACKBONE.NAME", "build_aa_resnet_backbone", "MODEL.AA.NORM", "GN"] + ALL_OUT)
