"""The LazyConfigs build the same models as their YAML twins (both call aa_resnet with explicit arguments)."""
import glob
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402

pytestmark = pytest.mark.slow  # RetinaNets built twice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = sorted(glob.glob(os.path.join(ROOT, "configs", "lazy", "*.py")))


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lazy_file", LAZY, ids=os.path.basename)
def test_lazy_config_builds_its_yaml_twin(lazy_file):
    lazy = LazyConfig.load(lazy_file)
    yaml_file = os.path.join(ROOT, "configs", os.path.basename(lazy_file).replace(".py", ".yaml"))
    cfg = setup_cfg(yaml_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    lazy_model, yaml_model = instantiate(lazy.model), build_model(cfg)
    assert _shapes(lazy_model) == _shapes(yaml_model)
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    assert list(lazy.lr_multiplier.scheduler.milestones[:-1]) == list(cfg.SOLVER.STEPS)
