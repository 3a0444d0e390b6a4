"""Reading untrusted weight files and YAML safely, and writing outputs atomically."""
import contextlib
import io
import os
import pickle
import tempfile
from typing import IO, Any, Iterator, Union

import torch
import yaml

from .errors import UnsafePickleError

__all__ = ["AtomicWritePathManager", "UnsafePickleError", "atomic_path", "atomic_write", "load_pickle_weights",
           "load_torch_weights", "load_yaml_data"]

# What weight pickles need: numpy arrays and scalars, plain containers, and tensors.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
}
_NUMPY_DTYPE_MODULES = ("numpy.dtypes", "numpy")


def _tensor_from_bytes(data):
    # torch pickles a storage as the bytes of a torch.save file; read those bytes weights-only too.
    return torch.load(io.BytesIO(data), weights_only=True)


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module in _NUMPY_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _tensor_from_bytes
        raise UnsafePickleError(
            f"{self.path}: refusing to unpickle '{module}.{name}': weight files may hold only tensors, "
            "arrays and plain containers. Allow it (MODEL.WEIGHTS_ALLOW_UNSAFE_PICKLE True, or "
            "allow_unsafe=True) only if you trust its source."
        )


def load_pickle_weights(path: str, allow_unsafe: bool = False) -> Any:
    """Unpickle a weight file (.pkl); objects other than tensors, arrays and containers raise
    UnsafePickleError naming the file, unless allow_unsafe."""
    with open(path, "rb") as f:
        if allow_unsafe:
            return pickle.load(f, encoding="latin1")
        return _WeightsUnpickler(f, path).load()


def load_torch_weights(path: str, map_location: Union[str, torch.device] = "cpu") -> Any:
    """torch.load with weights-only loading; the error names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: not a weights-only torch file ({e})") from e


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """The name of a temporary file beside `path` (ending in `suffix`, for writers that read the format
    from it), moved onto `path` only once the block succeeds and removed if it fails, so readers and
    resumed runs never see a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before it takes the name
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """`path` opened for writing through `atomic_path`: the file appears whole once the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


class AtomicWritePathManager:
    """An iopath PathManager whose `open(path, "w" or "wb")` of a local path goes through `atomic_write`.

    Everything else (reading, other modes, paths of a registered handler such as "s3://..." or
    "detectron2://...", exists, ls, rm, get_local_path) is the wrapped PathManager's: iopath's `mv`
    refuses to replace an existing file, so only local files can be replaced atomically.
    """

    def __init__(self, path_manager):
        self.wrapped = path_manager

    def open(self, path: str, mode: str = "r", **kwargs) -> IO:
        if mode in ("w", "wb") and "://" not in path and not kwargs:
            return atomic_write(path, mode)
        return self.wrapped.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


class _DataLoader(yaml.SafeLoader):
    """SafeLoader that reads a Python-tagged node as the plain mapping, sequence or scalar it tags."""


def _untagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_DataLoader.add_multi_constructor("tag:yaml.org,2002:python/", _untagged)


def load_yaml_data(path: str) -> Any:
    """A YAML file as plain data; Python tags (detectron2's LazyConfig.save writes some, e.g. for a
    ShapeSpec) are read as the data they tag, nothing is imported or run."""
    with open(path) as f:
        return yaml.load(f, Loader=_DataLoader)
