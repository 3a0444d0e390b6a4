"""Loading ResNet weights into AA-ResNet models.

Every AAConv2d keeps the name of the 3x3 convolution it replaces, so pretrained weights load by name:

- the convolution branch (`...convK.weight`, shape (Fout - dv, Cin, 3, 3)) takes the FIRST Fout - dv output
  filters of the pretrained (Fout, Cin, 3, 3) kernel;
- the norm after the concatenation (`...convK.norm.*`, Fout channels) loads whole; where the layer's
  branches have norms of their own (`attention_norm`, under a frozen block norm), the convolution's norm
  takes the first Fout - dv channels and `attention_norm` the last dv, from weights trained with their
  attention (an AA classifier's), else stays at its initialisation;
- the attention branch (`qkv`, `attn_out`, `rel_h`, `rel_w`) has no pretrained counterpart and stays at its
  random initialisation; the checkpointer logs it and keeps the lists in `last_load_report`.

It works for plain state dicts (.pth, detectron2 checkpoints), detectron2-format .pkl files such as
tools/convert_pretrained_to_d2.py writes, and Caffe2-named MSRA ImageNet .pkl files.

Files are read and written defensively:

- .pth/.pt (and any other non-.pkl file) load with torch's weights-only loading; a file holding other
  objects raises `UnsafePickleError` naming it.
- .pkl files are first read by a restricted unpickler that admits only tensors, arrays and plain
  containers, then handed to detectron2's reader; unless the checkpointer is built with
  `allow_unsafe_pickle=True` (config key MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE), which skips the check.
- fvcore's `save` writes through `AtomicWritePathManager`: a checkpoint and the `last_checkpoint` tag in
  a local directory go to a temporary file that is fsynced and renamed, so a run killed at any moment
  leaves the tag naming a complete checkpoint; other paths (a registered iopath handler) are written by
  detectron2's PathManager as before. A model with non-finite parameters or buffers is not saved (the
  last good checkpoint stays the one `--resume` loads).
"""
import fnmatch
import logging
import os
from typing import Dict, List, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
import torch
from torch import nn

from .errors import WeightsError
from .layers import AAConv2d
from .layers.relative_logits import resize_relative_table
from .safe_io import AtomicWritePathManager, load_pickle_weights, load_torch_weights

__all__ = ["AACheckpointer", "ATTENTION_PARAMETERS", "is_attention_parameter", "fit_aa_layers", "pretrained_shapes"]

# Parameters of an AAConv2d that no ResNet checkpoint has.
ATTENTION_PARAMETERS = ("qkv", "attn_out", "attention_norm", "rel_h", "rel_w")
NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")


def is_attention_parameter(key: str) -> bool:
    """Whether a state-dict key is one of an AAConv2d's ATTENTION_PARAMETERS ("...conv2.qkv.weight",
    "...conv2.rel_h")."""
    parts = key.split(".")
    return (len(parts) >= 2 and parts[-2] in ATTENTION_PARAMETERS) or parts[-1] in ("rel_h", "rel_w")


def _aa_layers(model: nn.Module, prefix: str = ""):
    return [(prefix + name, m) for name, m in model.named_modules() if isinstance(m, AAConv2d)]


def pretrained_shapes(model: nn.Module, prefix: str = "") -> Dict[str, tuple]:
    """{state-dict key: its shape in a plain ResNet} for the AAConv2d entries narrower than there: each
    conv-branch weight (Fout, Cin, k, k) and, where the attention has a norm of its own, the entries of
    the convolution's norm (Fout,)."""
    shapes = {}
    for name, m in _aa_layers(model, prefix):
        shapes[f"{name}.weight"] = (m.out_channels, m.in_channels, m.kernel_size, m.kernel_size)
        if m.attention_norm is not None and m.norm is not None:
            own = dict(m.norm.named_parameters(), **dict(m.norm.named_buffers()))
            shapes.update({f"{name}.norm.{e}": (m.out_channels,) for e in NORM_ENTRIES if e in own})
    return shapes


def fit_aa_layers(state: dict, model: nn.Module, prefix: str = "") -> Dict[str, Tuple[tuple, tuple]]:
    """Fit the full-width entries of `state` (a plain ResNet's, or an AA classifier's whose norm covers the
    concatenation) to the AAConv2d layers of `model` (keys with `prefix`), in place.

    A conv-branch weight takes the first Fout - dv filters. Where the attention has a norm of its own,
    the convolution's norm takes the first Fout - dv channels, and `attention_norm` the last dv when
    `state` holds the layer's attention (`qkv`): weights trained with it; otherwise those channels were
    statistics of the filters the attention replaced and are dropped. Returns {key: (full shape, fitted
    shape)} of the entries sliced."""
    fitted = {}
    shapes = pretrained_shapes(model, prefix)
    for name, m in _aa_layers(model, prefix):
        keep = m.out_channels - m.value_depth
        trained_with_attention = f"{name}.qkv.weight" in state
        for key in [k for k in shapes if k.rpartition(".")[0] in (name, f"{name}.norm")]:
            if key not in state or tuple(state[key].shape) != shapes[key]:
                continue
            full = state[key]
            state[key] = full[:keep]
            fitted[key] = (shapes[key], tuple(state[key].shape))
            if trained_with_attention and key.startswith(f"{name}.norm."):
                state[f"{name}.attention_norm.{key.rpartition('.')[2]}"] = full[keep:]
    return fitted


# Names of the temporary files `atomic_write` leaves when a save is killed.
PARTIAL_FILES = (".*.pth.*.tmp", ".last_checkpoint.*.tmp")

logger = logging.getLogger(__name__)


class AACheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads pretrained 3x3 kernels into AAConv2d convolution branches.

    After `load`, `last_load_report` is a dict with
    `sliced` ({key: (pretrained shape, loaded shape)}: conv branches that took the first Fout - dv filters)
    and `random` (sorted model keys left at their initialisation, attention parameters among them).
    """

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = AtomicWritePathManager(self.path_manager)
        self.allow_unsafe_pickle = bool(allow_unsafe_pickle)
        self.last_load_report = None

    @classmethod
    def from_config(cls, model, cfg, save_dir: str = "", **kwargs) -> "AACheckpointer":
        """An AACheckpointer that loads .pkl files with plain pickle only if cfg.MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE
        (unless `allow_unsafe_pickle` is given)."""
        kwargs.setdefault("allow_unsafe_pickle", cfg.MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE)
        return cls(model, save_dir, **kwargs)

    # ---- reading untrusted files -------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs):
        """detectron2's load; a local weights file that does not exist is a WeightsError naming it (fvcore
        asserts)."""
        if path and "://" not in path and not os.path.isfile(path):
            raise WeightsError(f"weights file not found: {path}")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith(".pkl") and not self.allow_unsafe_pickle:
            load_pickle_weights(filename)  # raises UnsafePickleError naming the file and the object
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_torch_weights(f)

    # ---- writing checkpoints -----------------------------------------------------------------------
    def save(self, name: str, **kwargs) -> None:
        """fvcore's save, skipped (with an error naming the entries) when the model is not finite."""
        bad = [k for k, v in self.model.state_dict().items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            self.logger.error(
                "Not saving checkpoint '%s': %d model entries hold NaN or Inf (%s%s); the last good checkpoint "
                "stays %s", name, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "",
                self.get_checkpoint_file() or "(none)")
            return
        super().save(name, **kwargs)

    def remove_partial_files(self) -> List[str]:
        """Delete the temporary files a killed save left in save_dir; returns their paths."""
        if not self.save_dir or not self.save_to_disk or not self.path_manager.isdir(self.save_dir):
            return []
        stale = [os.path.join(self.save_dir, name) for name in self.path_manager.ls(self.save_dir)
                 if any(fnmatch.fnmatch(name, pattern) for pattern in PARTIAL_FILES)]
        for path in stale:
            self.path_manager.rm(path)
        if stale:
            self.logger.info("Removed %d partial files of an interrupted save: %s", len(stale), stale)
        return stale

    # ---- ResNet weights into AAConv2d --------------------------------------------------------------
    def _load_model(self, checkpoint):
        """Fit pretrained full-width entries to the AAConv2d branches (`fit_aa_layers`), then detectron2's load.

        detectron2's name matching (checkpoints with `matching_heuristics`) skips keys whose shapes
        differ from the model's, so it runs here against the model's keys with the AA layers' entries at
        their pretrained shape.
        """
        model_state = self.model.state_dict()
        state = checkpoint["model"]
        if checkpoint.pop("matching_heuristics", False):
            full = {k: torch.empty(s, device="meta") for k, s in pretrained_shapes(self.model).items()}
            state = align_and_update_state_dicts(
                {**model_state, **full}, state, c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
        sliced = fit_aa_layers(state, self.model)
        self._resize_relative_tables(state, model_state)
        checkpoint["model"] = state
        incompatible = super()._load_model(checkpoint)
        self._report(sliced, incompatible)
        return incompatible

    def _resize_relative_tables(self, state, model_state):
        """Relative tables of another size than the model's (weights made for other image sizes) resized
        exactly under the clipping rule (`resize_relative_table`), with a log line: never dropped."""
        resized = []
        for key, value in state.items():
            if (key.endswith((".rel_h", ".rel_w")) and key in model_state and value.dim() == 2
                    and value.shape[1] == model_state[key].shape[1] and value.shape[0] != model_state[key].shape[0]):
                state[key] = resize_relative_table(torch.as_tensor(value), model_state[key].shape[0])
                resized.append(f"{key} {value.shape[0]} -> {model_state[key].shape[0]} rows")
        if resized:
            logger.info("Relative tables resized to the model's (offsets beyond the smaller table repeat its "
                        "edge rows, a larger one keeps its centre): %s", "; ".join(resized))

    def _report(self, sliced, incompatible):
        loaded_shapes = {k for k, _, _ in incompatible.incorrect_shapes}
        random = sorted(set(incompatible.missing_keys) | loaded_shapes)
        self.last_load_report = {"sliced": sliced, "random": random}
        if not sliced and not any(is_attention_parameter(k) for k in random):
            return
        attention = [k for k in random if is_attention_parameter(k)]
        other = [k for k in random if not is_attention_parameter(k)]
        lines = [
            f"AA-ResNet weights: {len(sliced)} entries of attention-augmented convolutions took the first Fout - dv "
            "channels of their pretrained kernel or norm.",
            f"Left at random initialisation: {len(attention)} attention parameters "
            f"({', '.join(ATTENTION_PARAMETERS)} of every AAConv2d)"
            + (f" and {len(other)} other entries outside AA convolutions (listed with the missing keys)."
               if other else "."),
        ]
        lines += [f"  random: {k}" for k in attention]
        logger.info("\n".join(lines))
