"""Loading ResNet weights into AA-ResNet models.

Every AAConv2d keeps the name of the 3x3 convolution it replaces, so pretrained weights load by name:

- the convolution branch (`...convK.weight`, shape (Fout - dv, Cin, 3, 3)) takes the FIRST Fout - dv output
  filters of the pretrained (Fout, Cin, 3, 3) kernel;
- the norm after the concatenation (`...convK.norm.*`, Fout channels) loads whole;
- the attention branch (`qkv`, `attn_out`, `rel_h`, `rel_w`) has no pretrained counterpart and stays at its
  random initialisation; the checkpointer logs it and keeps the lists in `last_load_report`.

It works for plain state dicts (.pth, detectron2 checkpoints), detectron2-format .pkl files such as
tools/convert_torchvision_to_d2.py writes, and Caffe2-named MSRA ImageNet .pkl files.
"""
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from fvcore.common.checkpoint import _strip_prefix_if_present
import torch

from .layers import AAConv2d

__all__ = ["AACheckpointer", "ATTENTION_PARAMETERS"]

# Parameters of an AAConv2d that no ResNet checkpoint has.
ATTENTION_PARAMETERS = ("qkv", "attn_out", "rel_h", "rel_w")

logger = logging.getLogger(__name__)


class AACheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads pretrained 3x3 kernels into AAConv2d convolution branches.

    After `load`, `last_load_report` is a dict with
    `sliced` ({key: (pretrained shape, loaded shape)}: conv branches that took the first Fout - dv filters)
    and `random` (sorted model keys left at their initialisation, attention parameters among them).
    """

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.last_load_report = None

    def _aa_conv_shapes(self):
        """{state-dict key of each AAConv2d's conv-branch weight: full (Fout, Cin, k, k) pretrained shape}."""
        return {
            f"{name}.weight": (m.out_channels, m.in_channels, m.kernel_size, m.kernel_size)
            for name, m in self.model.named_modules()
            if isinstance(m, AAConv2d)
        }

    def _load_model(self, checkpoint):
        full_shapes = self._aa_conv_shapes()
        state = checkpoint["model"]
        self._convert_ndarray_to_tensor(state)
        _strip_prefix_if_present(state, "module.")
        if checkpoint.pop("matching_heuristics", False):
            # Name matching drops shape-mismatched keys: show it the AA conv weights at their pretrained shape.
            model_state = dict(self.model.state_dict())
            for key, shape in full_shapes.items():
                model_state[key] = torch.empty(shape, device="meta")
            state = align_and_update_state_dicts(
                model_state, state, c2_conversion=checkpoint.get("__author__", None) == "Caffe2"
            )
        sliced = {}
        model_state = self.model.state_dict()
        for key, full_shape in full_shapes.items():
            value = state.get(key)
            if value is None:
                continue
            target = tuple(model_state[key].shape)
            if tuple(value.shape) == full_shape and full_shape != target:
                state[key] = value[: target[0]].clone()
                sliced[key] = (full_shape, target)
        checkpoint["model"] = state
        incompatible = super()._load_model(checkpoint)
        self._report(sliced, incompatible)
        return incompatible

    def _report(self, sliced, incompatible):
        loaded_shapes = {k for k, _, _ in incompatible.incorrect_shapes}
        random = sorted(set(incompatible.missing_keys) | loaded_shapes)
        self.last_load_report = {"sliced": sliced, "random": random}
        if not sliced and not any(self._is_attention(k) for k in random):
            return
        attention = [k for k in random if self._is_attention(k)]
        other = [k for k in random if not self._is_attention(k)]
        lines = [
            f"AA-ResNet weights: {len(sliced)} attention-augmented convolutions took the first Fout - dv "
            "filters of their pretrained 3x3 kernel (their norms loaded whole).",
            f"Left at random initialisation: {len(attention)} attention parameters "
            f"({', '.join(ATTENTION_PARAMETERS)} of every AAConv2d)"
            + (f" and {len(other)} other entries outside AA convolutions (listed with the missing keys)."
               if other else "."),
        ]
        lines += [f"  random: {k}" for k in attention]
        logger.info("\n".join(lines))

    @staticmethod
    def _is_attention(key):
        parts = key.split(".")
        return (len(parts) >= 2 and parts[-2] in ATTENTION_PARAMETERS) or parts[-1] in ("rel_h", "rel_w")
