"""Untrusted weight files: weights-only .pth/.pt, restricted .pkl unless MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE."""
import datetime
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from aa_detection.checkpoint import AACheckpointer  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.safe_io import UnsafePickleError  # noqa: E402

NO_DATA = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class NotATensor:
    pass


def _model():
    return nn.Sequential(nn.Linear(3, 2))


def _weights():
    return {"0.weight": np.full((2, 3), 0.5, dtype=np.float32), "0.bias": np.zeros(2, dtype=np.float32)}


def _checkpointer(tmp_path, *opts):
    cfg = setup_cfg(None, list(opts) + NO_DATA)
    return AACheckpointer.from_config(_model(), cfg, str(tmp_path / "out"))


def test_trainer_uses_the_safe_checkpointer(tmp_path):
    ckpt = _checkpointer(tmp_path)
    assert isinstance(ckpt, AACheckpointer) and not ckpt.allow_unsafe_pickle
    assert _checkpointer(tmp_path, "MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE", "True").allow_unsafe_pickle


def test_pkl_with_code_is_refused_naming_the_file_and_the_key(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": _weights(), "__author__": "x", "extra": Exploit(marker)}))
    with pytest.raises(UnsafePickleError) as info:
        _checkpointer(tmp_path).resume_or_load(str(path), resume=False)
    msg = str(info.value)
    assert str(path) in msg and "posix.system" in msg and "MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE" in msg
    assert not marker.exists()


def test_pkl_with_other_objects_loads_only_when_allowed(tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": _weights(), "__author__": "x", "date": datetime.date(2019, 4, 22)}))
    with pytest.raises(UnsafePickleError, match="datetime"):
        _checkpointer(tmp_path).resume_or_load(str(path), resume=False)
    ckpt = _checkpointer(tmp_path, "MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE", "True")
    ckpt.resume_or_load(str(path), resume=False)
    assert torch.equal(ckpt.model[0].weight, torch.full((2, 3), 0.5))


def test_plain_pkl_of_arrays_loads_by_default(tmp_path):
    # a Caffe2-style pickle: a flat dict of arrays, its names matched to the model's
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"blobs": _weights()}))
    ckpt = _checkpointer(tmp_path)
    ckpt.resume_or_load(str(path), resume=False)
    assert torch.equal(ckpt.model[0].weight, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_torch_file_with_objects_is_refused_by_weights_only_loading(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save({"model": _model().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(UnsafePickleError) as info:
        _checkpointer(tmp_path).resume_or_load(str(path), resume=False)
    assert str(path) in str(info.value) and "weights-only" in str(info.value)


def test_torch_state_dict_loads_weights_only(tmp_path):
    model = _model()
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, path)
    ckpt = _checkpointer(tmp_path)
    assert ckpt.resume_or_load(str(path), resume=False)["iteration"] == 7
    assert torch.equal(ckpt.model[0].weight, model[0].weight)
