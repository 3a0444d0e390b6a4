#!/usr/bin/env bash
# Install what aa_detection and its tests need into the active Python environment:
# the pinned requirements, detectron2 at the tested commit, and the project with its CPU attention kernel.
#
#   bash tools/install.sh
#   DETECTRON2_SOURCE=/path/to/detectron2-<commit>.tar.gz bash tools/install.sh   # no access to the git host
#
# DETECTRON2_SOURCE is anything pip installs (a source archive, a folder, a git URL); by default the
# pinned commit from GitHub. An importable detectron2 is kept.
set -euo pipefail
DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
cd "$(dirname "$0")/.."

pip install -r requirements.txt
if python -c "import detectron2" 2>/dev/null; then
  echo "detectron2 is installed: $(python -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
  pip install --no-build-isolation \
    "${DETECTRON2_SOURCE:-git+https://github.com/facebookresearch/detectron2.git@$DETECTRON2_COMMIT}"
fi
pip install --no-build-isolation -e .
python -c "import aa_detection.layers.kernel as k; assert k.kernel_available(), 'the CPU kernel aa_detection._C was not built'"
