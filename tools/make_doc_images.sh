#!/usr/bin/env bash
# The pictures of docs/images, made again from the current defaults: the SEED 1 runs of
# tools/run_synthetic.py (trained when missing), then the visualize.py commands of docs/GETTING_STARTED.md
# ("Examples"), whose outputs are copied over docs/images.
#
#   bash tools/make_doc_images.sh [RUNS]   # RUNS: the run_synthetic output folder, default output/synthetic
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-output/synthetic}
OUT=$RUNS/pictures
AA_CFG=configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml
R_CFG=configs/synthetic/retinanet_R_18_FPN_synthetic.yaml
AA_W=$RUNS/retinanet_AA_R_18_FPN/seed1/model_final.pth
R_W=$RUNS/retinanet_R_18_FPN/seed1/model_final.pth
if [ ! -f "$AA_W" ] || [ ! -f "$R_W" ]; then
  python tools/run_synthetic.py --output "$RUNS"
fi
python tools/visualize.py predict --config-file $AA_CFG --weights "$AA_W" --dataset synthetic_val --max-images 6 \
    --threshold 0.5 --scale 2 --quality 75 --quiet --output "$OUT/predict"
python tools/visualize.py results --dataset synthetic_val --max-images 6 --threshold 0.5 --scale 2 --quality 75 \
    --results "$RUNS/retinanet_R_18_FPN/seed1/inference/synthetic_val/coco_instances_results.json" \
    --quiet --output "$OUT/results"
python tools/visualize.py attention --config-file $AA_CFG --weights "$AA_W" \
    --input "${DETECTRON2_DATASETS:-datasets}/synthetic/val/000000.png" --top-k 3 --threshold 0.5 --tile-size 128 \
    --quality 75 --quiet --output "$OUT/attention"
python tools/visualize.py compare --config-file $R_CFG $AA_CFG --weights "$R_W" "$AA_W" \
    --names ResNet-18 AA-ResNet-18 --dataset synthetic_val --max-images 6 --threshold 0.5 --scale 1.5 --quality 75 \
    --quiet --output "$OUT/compare"
cp "$OUT/predict/000000.jpg" docs/images/predict_aa_r18.jpg
cp "$OUT/results/000000.jpg" docs/images/results_r18.jpg
cp "$OUT/attention/000000_attention.jpg" docs/images/attention_aa_r18_res5.jpg
cp "$OUT/compare/000001_compare.jpg" docs/images/compare_r18_aa_r18.jpg
ls -l docs/images
