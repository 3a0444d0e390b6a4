"""What a fresh install promises: CI fails instead of skipping when a dependency is missing, and an install
without the compiled kernel says so on import."""
import os
import subprocess
import sys

import pytest

from common import ROOT


def _hiding(tmp_path, *modules):
    """The environment of a Python process in which importing `modules` fails (sitecustomize blocks them)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("hidden, named", [("detectron2", "detectron2"), ("timm", "timm"),
                                           ("aa_detection._C", "the CPU attention kernel aa_detection._C")])
def test_ci_fails_at_the_start_naming_a_missing_dependency(tmp_path, hidden, named):
    env = _hiding(tmp_path, hidden)
    env["CI"] = "true"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests", "test_aa_conv.py")], env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-2000:]
    assert f"CI: {named} missing" in output and "bash tools/install.sh" in output


def test_import_without_the_kernel_warns_naming_the_slower_path_and_the_rebuild(tmp_path):
    env = _hiding(tmp_path, "aa_detection._C")
    env.pop("AA_DETECTION_NO_EXTENSION", None)
    result = subprocess.run([sys.executable, "-c", "import aa_detection"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("aa_detection._C is not built") == 1
    assert "slower PyTorch paths" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr


def test_import_registers_the_timm_classifiers():
    pytest.importorskip("timm", reason="timm is not installed")
    script = "import aa_detection, timm; print(type(timm.create_model('aa_resnet18', num_classes=3)).__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["AAResNetClassifier"]
