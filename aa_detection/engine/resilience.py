"""Keeping a run's files consistent across kills and resumes.

- `MetricsWriter`: detectron2's JSONWriter (one JSON record per line, flushed and fsynced after each
  write) that can repair `metrics.json` before a run continues: a torn last line left by a killed
  process is dropped, and on resume so are the records of iterations at or beyond the iteration the run
  resumes from (they were computed after the checkpoint and will be computed again).
- `repair_metrics_file`: that repair on its own, written atomically.
- `check_run_identity`: a run never starts in a folder that holds another config's run.
"""
import json
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

from detectron2.utils.events import JSONWriter

from ..errors import ConfigError
from ..safe_io import atomic_write, load_yaml_data

__all__ = ["MetricsWriter", "repair_metrics_file", "check_run_identity"]

logger = logging.getLogger(__name__)


def repair_metrics_file(path: str, keep_before: Optional[int] = None) -> Tuple[int, int]:
    """Rewrite the JSON-lines file `path` keeping its complete records, and only those with
    iteration < keep_before when given. Returns (kept, dropped) record counts; (0, 0) if no file."""
    if not os.path.isfile(path):
        return 0, 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            dropped += 1  # a line cut by a killed process
            continue
        if not isinstance(rec, dict) or (
                keep_before is not None and isinstance(rec.get("iteration"), int) and rec["iteration"] >= keep_before):
            dropped += 1
            continue
        kept.append(line.strip())
    if dropped:
        with atomic_write(path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
        logger.info("%s: dropped %d torn or superseded records, kept %d", path, dropped, len(kept))
    return len(kept), dropped


class MetricsWriter(JSONWriter):
    """JSONWriter whose file can be repaired (see the module docstring) before training writes to it."""

    def __init__(self, json_file, **kwargs):
        super().__init__(json_file, **kwargs)
        self.json_file = json_file

    def repair(self, keep_before: Optional[int] = None) -> Tuple[int, int]:
        self._file_handle.close()
        result = repair_metrics_file(self.json_file, keep_before)
        self._file_handle = open(self.json_file, "a")
        return result


def check_run_identity(key: str, output_dir: str, identity: Callable[[dict], Dict[str, Any]],
                       config: Callable[[], dict]) -> None:
    """ConfigError when `output_dir` holds the run of another config, so that its checkpoints, metrics.json
    and `--resume` would mix two runs.

    `identity` maps a config as plain data to the {name: value} entries that make a run itself (its model,
    its training data); it is applied to the config.yaml written at the start of the run in `output_dir`
    and to `config()`, this config as plain data (called only when the folder holds a run). `key` is the
    config key of the folder, for the message."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    old, new = identity(load_yaml_data(path) or {}), identity(config())
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if names:
        raise ConfigError(f"{key} {output_dir} holds the run of another config ({', '.join(names)} differ from "
                          f"its {path}): set another {key}, or remove that folder")
