#!/usr/bin/env bash
# Clean a folder and train a robust model on what is left, with the defaults of the
# paper (ResNet-18: use a GPU) or, on a CPU, the small CNN: ARCH=cnn bash pipeline.sh DATA
set -euo pipefail
data=${1:?usage: pipeline.sh DATA [WORKDIR]}
workdir=${2:-aabl-out}
arch=${ARCH:-resnet18}
aabl scan "$data" --arch "$arch" --workdir "$workdir"
# Exit 3 (after writing everything) if more than a third of the set looks poisoned.
aabl split --workdir "$workdir" --fail-over 0.33
aabl train --arch "$arch" --eps 8/255 --workdir "$workdir"
