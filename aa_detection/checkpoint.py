"""Loading ResNet weights into AA-ResNet models.

Every AAConv2d keeps the name of the 3x3 convolution it replaces, so pretrained weights load by name:

- the convolution branch (`...convK.weight`, shape (Fout - dv, Cin, 3, 3)) takes the FIRST Fout - dv output
  filters of the pretrained (Fout, Cin, 3, 3) kernel;
- the norm after the concatenation (`...convK.norm.*`, Fout channels) loads whole;
- the attention branch (`qkv`, `attn_out`, `rel_h`, `rel_w`) has no pretrained counterpart and stays at its
  random initialisation; the checkpointer logs it and keeps the lists in `last_load_report`.

It works for plain state dicts (.pth, detectron2 checkpoints), detectron2-format .pkl files such as
tools/convert_torchvision_to_d2.py writes, and Caffe2-named MSRA ImageNet .pkl files.

Files are read and written defensively:

- .pth/.pt (and any other non-.pkl file) load with torch's weights-only loading; a file holding other
  objects raises `UnsafePickleError` naming it.
- .pkl files go through a restricted unpickler that admits only tensors, arrays and plain containers,
  unless the checkpointer is built with `allow_unsafe_pickle=True` (config key
  MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE).
- `save` writes the checkpoint to a temporary file, fsyncs and renames it, then rewrites the
  `last_checkpoint` tag the same way, so a run killed at any moment leaves the tag naming a complete
  checkpoint. A model with non-finite parameters or buffers is not saved (the last good checkpoint stays
  the one `--resume` loads).
"""
import glob
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from fvcore.common.checkpoint import _strip_prefix_if_present
import torch

from .layers import AAConv2d
from .safe_io import atomic_write, load_pickle_weights, load_torch_weights

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

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe_pickle = bool(allow_unsafe_pickle)
        self.last_load_report = None

    # ---- reading untrusted files -------------------------------------------------------------------
    def _load_file(self, filename):
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # detectron2's formats; torch files via _torch_load below
        data = load_pickle_weights(filename, allow_unsafe=self.allow_unsafe_pickle)
        if not isinstance(data, dict):
            raise ValueError(f"{filename}: a .pkl weight file must hold a dict, got {type(data).__name__}")
        if "model" in data and "__author__" in data:  # detectron2 model-zoo layout
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        blobs = data.get("blobs", data)  # Caffe2 / Detectron1 layout: detection models keep "blobs"
        weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f):
        return load_torch_weights(f)

    # ---- writing checkpoints atomically ------------------------------------------------------------
    def _non_finite_entries(self):
        return [k for k, v in self.model.state_dict().items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]

    def save(self, name, **kwargs):
        """Write `name`.pth atomically, then the `last_checkpoint` tag; skip a model that is not finite."""
        if not self.save_dir or not self.save_to_disk:
            return
        bad = self._non_finite_entries()
        if bad:
            self.logger.error(
                "Not saving checkpoint '%s': %d model entries hold NaN or Inf (%s%s); the last good checkpoint "
                "stays %s", name, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "",
                self.get_checkpoint_file() or "(none)")
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def remove_partial_files(self):
        """Delete temporary files a killed save left in save_dir; returns their paths."""
        if not self.save_dir or not self.save_to_disk:
            return []
        stale = glob.glob(os.path.join(self.save_dir, ".*.pth.*.tmp"))
        stale += glob.glob(os.path.join(self.save_dir, ".last_checkpoint.*.tmp"))
        for path in stale:
            os.remove(path)
        if stale:
            self.logger.info("Removed %d partial files of an interrupted save: %s", len(stale), stale)
        return stale

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
