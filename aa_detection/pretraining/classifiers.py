"""AA-ResNet image classifiers in timm's model registry (importing this module registers them).

    import aa_detection.pretraining.classifiers  # noqa: F401
    model = timm.create_model("aa_resnet50", num_classes=1000)

`aa_resnet18/34/50/101` are the detection backbone of `aa_detection.modeling.aa_resnet` (the same
function builds both) with detectron2's classifier head; `d2_resnet18/34/50/101` are their plain
twins (no attention stages), so a baseline has the same parameter names. Parameter names are
detectron2's (`stem.conv1.weight`, `res4.2.conv2.qkv.weight`, `linear.weight`): a classifier's state
dict is a detection backbone's, plus the head (see `aa_detection.pretraining.convert` for the conversion).

The attention keyword arguments are the fields of `aa_detection.layers.AttentionSpec` (MODEL.AA's
keys, meanings and defaults); the norm is trainable BatchNorm ("BN") and `max_input_size` (which sizes
the relative tables) is the training image size, 224. timm is an optional dependency of aa_detection:
only this module needs it.
"""
from typing import Optional, Set

import torch
from torch import nn
import torch.nn.functional as F

try:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
except ImportError as e:  # timm is optional for the rest of the package
    raise ImportError("aa_detection.pretraining.classifiers needs timm: pip install timm "
                      "(or aa_detection[timm])") from e

from ..layers import AttentionSpec
from ..modeling.backbone import aa_resnet

__all__ = ["AAResNetClassifier"]


class AAResNetClassifier(nn.Module):
    """An `aa_resnet` backbone with global average pooling and a linear classifier, for timm.

    x (B, 3, H, W) normalised images -> logits (B, num_classes). The children are those of the
    detectron2 ResNet `aa_resnet` returns (stem, res2..res5, avgpool, linear), adopted under the same
    names; `forward_features` gives the res5 map (B, C, H/32, W/32). num_classes 0 gives pooled features.
    """

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        norm: str = "BN",
        stem_out_channels: int = 64,
        res2_out_channels: Optional[int] = None,
        width_per_group: int = 64,
        num_groups: int = 1,
        stride_in_1x1: bool = False,
        max_input_size: int = 224,
        **attention,
    ):
        super().__init__()
        spec = AttentionSpec(**attention)  # the MODEL.AA options; an unknown keyword is a TypeError
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r}: AA-ResNet classifiers pool with 'avg' only")
        if res2_out_channels is None:
            res2_out_channels = 64 if depth < 50 else 256
        # the aa_resnet arguments that decide the parameters (names and shapes) and what the attention
        # computes; a checkpoint stores them as its "architecture"
        self.architecture = dict(
            depth=depth, stem_out_channels=stem_out_channels, res2_out_channels=res2_out_channels,
            width_per_group=width_per_group, num_groups=num_groups, stride_in_1x1=stride_in_1x1,
            aa_stages=list(spec.aa_stages), num_heads=spec.num_heads, kappa=spec.kappa, upsilon=spec.upsilon,
            relative=spec.relative, downsample_stages=list(spec.downsample_stages),
        )
        resnet = aa_resnet(
            **{**spec.as_kwargs(), **self.architecture}, out_features=("res5",), in_channels=in_chans, norm=norm,
            max_input_size=max_input_size, num_classes=num_classes or None,
        )
        for name, child in resnet.named_children():
            self.add_module(name, child)
        self.stage_names = resnet.stage_names
        self.num_features = resnet.output_shape()["res5"].channels
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        if not num_classes:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.linear = nn.Identity()

    def no_weight_decay(self) -> Set[str]:
        """Relative position tables, like timm's position embeddings, are not weight-decayed."""
        return {n for n, _ in self.named_parameters() if n.endswith((".rel_h", ".rel_w"))}

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: AA-ResNet classifiers pool with 'avg' only")
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.normal_(self.linear.weight, std=0.01)  # detectron2's initialisation of the head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the res5 map (B, num_features, H/32, W/32)."""
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="stem.conv1", classifier="linear", **kwargs)


DEPTHS = (18, 34, 50, 101)
default_cfgs = generate_default_cfgs({f"{kind}_resnet{d}": _cfg() for kind in ("aa", "d2") for d in DEPTHS})


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> AAResNetClassifier:
    if variant.startswith("d2_"):
        kwargs.setdefault("aa_stages", ())
    return build_model_with_cfg(AAResNetClassifier, variant, pretrained, depth=depth, **kwargs)


@register_model
def aa_resnet18(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """AA-ResNet-18 (both 3x3 convolutions of res3-res5 blocks attention-augmented)."""
    return _create("aa_resnet18", 18, pretrained, **kwargs)


@register_model
def aa_resnet34(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """AA-ResNet-34."""
    return _create("aa_resnet34", 34, pretrained, **kwargs)


@register_model
def aa_resnet50(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """AA-ResNet-50 (the 3x3 convolution of res3-res5 bottlenecks attention-augmented)."""
    return _create("aa_resnet50", 50, pretrained, **kwargs)


@register_model
def aa_resnet101(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """AA-ResNet-101."""
    return _create("aa_resnet101", 101, pretrained, **kwargs)


@register_model
def d2_resnet18(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """Plain ResNet-18 with detectron2's names: the baseline of aa_resnet18."""
    return _create("d2_resnet18", 18, pretrained, **kwargs)


@register_model
def d2_resnet34(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """Plain ResNet-34 with detectron2's names: the baseline of aa_resnet34."""
    return _create("d2_resnet34", 34, pretrained, **kwargs)


@register_model
def d2_resnet50(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """Plain ResNet-50 with detectron2's names: the baseline of aa_resnet50."""
    return _create("d2_resnet50", 50, pretrained, **kwargs)


@register_model
def d2_resnet101(pretrained: bool = False, **kwargs) -> AAResNetClassifier:
    """Plain ResNet-101 with detectron2's names: the baseline of aa_resnet101."""
    return _create("d2_resnet101", 101, pretrained, **kwargs)
