from .aa_conv import AAConv2d, attention_depths
from .relative_attention import relative_attention_2d, relative_table

__all__ = ["AAConv2d", "attention_depths", "relative_attention_2d", "relative_table"]
