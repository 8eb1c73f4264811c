#!/usr/bin/env bash
# Regenerates example_results/ from example_images/ with the published PSPNet
# weights: one run of pspnet.py per (model, image) pair below, each writing
# example_results/<image stem>_<model>_seg.jpg, _seg_blended.jpg, _probs.jpg
# and _seg_read.png.
# Arguments are passed on to every pspnet.py run (e.g. --sliding).
# Set PYTHON to choose the interpreter (default: python).
set -euo pipefail

cd "$(dirname "$0")/.."

# model: the example images suited to it.
declare -A IMAGES=(
  [pspnet50_ade20k]="coffee.png rocket.jpg astronaut.png"
  [pspnet101_voc2012]="chelsea.png astronaut.png"
  [pspnet101_cityscapes]="rocket.jpg"
)

for model in pspnet50_ade20k pspnet101_voc2012 pspnet101_cityscapes; do
  for image in ${IMAGES[$model]}; do
    echo "$model: example_images/$image"
    "${PYTHON:-python}" pspnet.py -m "$model" -i "example_images/$image" \
      -o "example_results/${image%.*}_${model}.jpg" "$@"
  done
done
