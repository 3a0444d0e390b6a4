import collections
import datetime
import os
import pickle

import numpy as np
import pytest
import torch

from aa_detection.safe_io import UnsafePickleError, atomic_write, load_pickle_weights, load_torch_weights


def test_weight_pickle_of_arrays_and_tensors_loads(tmp_path):
    weights = {
        "model": collections.OrderedDict(conv=np.arange(6, dtype=np.float32).reshape(2, 3), step=np.int64(3)),
        "tensor": torch.arange(4.0),
        "__author__": "someone",
        "shapes": [(1, 2), {"a": 1.5}],
    }
    path = tmp_path / "w.pkl"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(weights, protocol=protocol))
        loaded = load_pickle_weights(str(path))
        assert np.array_equal(loaded["model"]["conv"], weights["model"]["conv"])
        assert loaded["model"]["step"] == 3 and loaded["shapes"] == weights["shapes"]
        assert torch.equal(loaded["tensor"], weights["tensor"])


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [Exploit(), {"when": datetime.datetime(2020, 1, 1)}])
def test_pickle_with_other_objects_is_refused_unless_allowed(tmp_path, payload):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "extra": payload}))
    with pytest.raises(UnsafePickleError, match="evil.pkl") as info:
        load_pickle_weights(str(path))
    assert "MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE" in str(info.value)
    if isinstance(payload, dict):
        assert load_pickle_weights(str(path), allow_unsafe=True)["extra"] == payload


def test_torch_weights_load_weights_only(tmp_path):
    good, evil = tmp_path / "good.pth", tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 5}, good)
    assert load_torch_weights(str(good))["iteration"] == 5
    torch.save({"model": {}, "extra": Exploit()}, evil)
    with pytest.raises(UnsafePickleError, match="evil.pth"):
        load_torch_weights(str(evil))


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out" / "result.json"
    with atomic_write(str(path), "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["result.json"]
