"""AttentionSpec: the attention options defined once, read by the config, the layer, the backbone, the
timm classifiers and pretraining."""
from dataclasses import fields
import inspect

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
from detectron2.config import get_cfg  # noqa: E402

from aa_detection.config import add_aa_config, setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d, AttentionSpec  # noqa: E402
from aa_detection.modeling import aa_resnet  # noqa: E402
from aa_detection.modeling.backbone import aa_resnet_arguments  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402


def _defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def test_config_layer_and_backbone_take_the_specs_defaults():
    spec = AttentionSpec()
    assert AttentionSpec.from_config(add_aa_config(get_cfg()).MODEL.AA) == spec
    backbone = _defaults(aa_resnet)
    layer = _defaults(AAConv2d.__init__)
    for option in fields(AttentionSpec):
        assert backbone[option.name] == getattr(spec, option.name), option.name
    for name in ("num_heads", "kappa", "upsilon", "relative", "impl", "attention_gain"):  # the layer's own
        assert layer[name] == getattr(spec, name), name


def test_a_config_hands_its_spec_to_the_backbone():
    cfg = setup_cfg(None, ["MODEL.AA.NUM_HEADS", "4", "MODEL.AA.STAGES", "['res4', 'res5']",
                           "MODEL.AA.ATTENTION_GAIN", "0.5", "MODEL.AA.DOWNSAMPLE_STAGES", "[]"])
    arguments = aa_resnet_arguments(cfg, ShapeSpec(channels=3))
    assert AttentionSpec(**{f.name: arguments[f.name] for f in fields(AttentionSpec)}) == AttentionSpec(
        aa_stages=("res4", "res5"), num_heads=4, attention_gain=0.5, downsample_stages=())
    backbone = aa_resnet(**arguments)
    assert backbone.res4[0].conv2.num_heads == 4 and not hasattr(backbone.res3[0].conv2, "num_heads")


def test_classifiers_and_pretraining_take_every_option():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    import aa_detection.pretraining.classifiers  # noqa: F401
    from aa_detection.pretraining.train import build_argument_parser, model_kwargs

    model = timm.create_model("aa_resnet18", num_classes=3, num_heads=2, aa_stages=["res5"], downsample_stages=[])
    assert model.res5[0].conv1.num_heads == 2 and not hasattr(model.res4[0].conv1, "num_heads")
    with pytest.raises(TypeError, match="heads"):
        timm.create_model("aa_resnet18", heads=2)
    args = build_argument_parser().parse_args(
        ["--data", "d", "--output", "o", "--num-heads", "2", "--no-relative", "--attention-gain", "0.5",
         "--aa-stages", "res5", "--img-size", "64"])
    kwargs = model_kwargs(args)
    assert kwargs == {"num_heads": 2, "relative": False, "attention_gain": 0.5, "aa_stages": ["res5"],
                      "max_input_size": 64}
    flags = {flag for action in build_argument_parser()._actions for flag in action.option_strings}
    assert {"--" + f.name.replace("_", "-") for f in fields(AttentionSpec)} <= flags
