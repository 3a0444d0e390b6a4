#!/usr/bin/env bash
# What tools/gpu_check.py installs on a GPU machine that has no package registry, gathered here: the wheels
# of its requirements for the GPU machine's Python (3.12, manylinux x86_64) in .whl/ (those published only
# as source are built here: all are pure Python) and detectron2's source archive at the pinned commit in
# .d2/. Both folders are git-ignored (.git/info/exclude); carry them with the repository.
#
#   bash tools/prepare_gpu_check.sh [DETECTRON2_ARCHIVE]   # default ../shared/vendor/detectron2-<commit>.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
commit=$(sed -n 's/^DETECTRON2_COMMIT=//p' tools/install.sh)
archive=${1:-../shared/vendor/detectron2-$commit.tar.gz}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl .d2
for folder in /.whl/ /.d2/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done

platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
"$PYTHON" -m aa_detection.benchmark.gpu_check --requirements | while read -r requirement; do
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$requirement" 2>/dev/null \
    || "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w .whl "$requirement"
done
cp "$archive" .d2/
ls .whl .d2
du -sh .whl .d2
