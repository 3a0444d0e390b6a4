"""The Faster and Mask R-CNN twins: each AA config is its plain twin with the AA-ResNet FPN backbone (P2-P6),
and each plain config is detectron2's model-zoo baseline."""
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from common import CONFIG_DIR  # noqa: E402

pytestmark = pytest.mark.slow  # R-50 R-CNN builds
TWINS = [(f"{m}_rcnn_R_50_FPN_{s}.yaml", f"{m}_rcnn_AA_R_50_FPN_{s}.yaml", f"{zoo}/{m}_rcnn_R_50_FPN_{s}.yaml")
         for m, zoo in (("faster", "COCO-Detection"), ("mask", "COCO-InstanceSegmentation")) for s in ("1x", "3x")]
CPU = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _differences(a, b):
    a, b = _flat(a), _flat(b)
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.parametrize("plain, aa, zoo", TWINS, ids=[t[1] for t in TWINS])
def test_twins_differ_from_the_model_zoo_only_in_the_backbone(plain, aa, zoo):
    plain_cfg = setup_cfg(os.path.join(CONFIG_DIR, plain), CPU)
    aa_cfg = setup_cfg(os.path.join(CONFIG_DIR, aa), CPU)
    zoo_cfg = setup_cfg(zoo, CPU)
    assert _differences(plain_cfg, zoo_cfg) == {"OUTPUT_DIR"}
    assert _differences(plain_cfg, aa_cfg) == {"MODEL.BACKBONE.NAME", "OUTPUT_DIR"}
    assert aa_cfg.MODEL.BACKBONE.NAME == "build_aa_resnet_fpn_backbone"
    assert len({plain_cfg.OUTPUT_DIR, aa_cfg.OUTPUT_DIR, zoo_cfg.OUTPUT_DIR}) == 3


@pytest.mark.parametrize("plain, aa", [t[:2] for t in TWINS if t[0].endswith("1x.yaml")], ids=lambda n: n)
def test_aa_twin_has_the_same_heads_and_a_p2_p6_backbone(plain, aa):
    plain_model = build_model(setup_cfg(os.path.join(CONFIG_DIR, plain), CPU))
    aa_model = build_model(setup_cfg(os.path.join(CONFIG_DIR, aa), CPU)).eval()
    heads = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()  # noqa: E731
                           if not k.startswith("backbone.bottom_up.")}
    assert heads(aa_model) == heads(plain_model)
    assert any(isinstance(m, AAConv2d) for m in aa_model.backbone.bottom_up.modules())
    with torch.no_grad():
        features = aa_model.backbone(torch.randn(1, 3, 224, 320))
    shapes = aa_model.backbone.output_shape()
    assert set(features) == set(shapes) == {"p2", "p3", "p4", "p5", "p6"}
    for name, spec in shapes.items():
        assert features[name].shape == (1, spec.channels, -(-224 // spec.stride), -(-320 // spec.stride))
