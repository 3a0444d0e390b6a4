"""The attention options of an AA-ResNet, defined once with their defaults.

`AttentionSpec` is what MODEL.AA holds (`AttentionSpec.from_config(cfg.MODEL.AA)`), what `aa_resnet`
and the timm classifiers take as keyword arguments (`spec.as_kwargs()`), what
`tools/pretrain_backbone.py` makes a flag of, field by field, and where `AAConv2d` and `config.py` read
their defaults. A new option is a field here, its use in the layer or the backbone, and its docs and
tests.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Tuple

__all__ = ["AttentionSpec"]


def _option(default: Any, help: str, key: str):
    return field(default=default, metadata={"help": help, "key": key})


@dataclass(frozen=True)
class AttentionSpec:
    """The attention of the augmented 3x3 convolutions: each field's metadata holds its MODEL.AA key and
    a one-line help."""

    aa_stages: Tuple[str, ...] = _option(("res3", "res4", "res5"), "attention-augmented stages", "STAGES")
    num_heads: int = _option(8, "attention heads Nh (dk and dv are multiples of it)", "NUM_HEADS")
    kappa: float = _option(0.2, "key depth over output channels, dk / Fout", "KAPPA")
    upsilon: float = _option(0.1, "value depth over output channels, dv / Fout", "UPSILON")
    relative: bool = _option(True, "2D relative position logits", "RELATIVE")
    impl: str = _option("auto", "attention path: 'auto' or one of relative_attention.PATHS", "IMPL")
    attention_norm: str = _option("", "the attention channels' norm name ('': the block's when trained, "
                                      "else BN)", "NORM")
    attention_gain: float = _option(1.0, "initial weight of the attention channels in their norm (> 0)",
                                    "ATTENTION_GAIN")
    downsample_stages: Tuple[str, ...] = _option(("res3",), "stages whose attention runs on its input "
                                                 "pooled 2x2, the output upsampled", "DOWNSAMPLE_STAGES")

    def as_kwargs(self) -> dict:
        """{field: value}, the keyword arguments of `aa_resnet` and the timm classifiers."""
        return asdict(self)

    @classmethod
    def from_config(cls, node) -> "AttentionSpec":
        """The spec of a MODEL.AA config node (lists become tuples)."""
        values = {f.name: getattr(node, f.metadata["key"]) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def config_keys(cls) -> dict:
        """{MODEL.AA key: default}, the config's keys (lists where the field is a tuple)."""
        return {f.metadata["key"]: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in fields(cls)}
