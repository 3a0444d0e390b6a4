"""Attention Augmented Convolutional Networks (Bello et al., ICCV 2019) for detectron2.

`import aa_detection` is all detectron2's own tools need to build the project's models (they load
weights that have the AA layers' shapes: see docs/MODEL.md): with detectron2 installed it registers the
AA-ResNet backbones in BACKBONE_REGISTRY and the compiled attention operator, and adds the project's
keys (MODEL.AA, DATASETS.*, ...) to detectron2's default config; `aa_detection.add_aa_config(cfg)`
adds them to a config of one's own. With timm installed it also registers the AA-ResNet classifiers
(`timm.create_model("aa_resnet50")`).
`aa_detection.layers` needs only torch.
"""
__version__ = "0.1.0"

from . import layers  # noqa: F401  (the attention operator torch.ops.aa_detection.*)

try:
    import detectron2  # noqa: F401
except ImportError:  # torch-only use of aa_detection.layers
    pass
else:
    from . import modeling  # noqa: F401  (registers the backbones)
    from .config import add_aa_config, add_aa_defaults  # noqa: F401  (add_aa_config: the public name)

    add_aa_defaults()  # detectron2's get_cfg() knows MODEL.AA and the project's other keys
    try:
        import timm  # noqa: F401
    except ImportError:  # the classifiers are optional
        pass
    else:
        from .pretraining import classifiers  # noqa: F401  (registers aa_resnet*, d2_resnet* in timm's registry)
