from .aa_conv import AAConv2d, attention_depths
from .relative_attention import relative_attention_2d
from .relative_logits import relative_table
from .spec import AttentionSpec

__all__ = ["AAConv2d", "AttentionSpec", "attention_depths", "relative_attention_2d", "relative_table"]
