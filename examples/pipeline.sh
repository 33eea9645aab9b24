#!/usr/bin/env bash
# Clean a folder and train a robust model on what is left, with the defaults of the
# paper (ResNet-18: use a GPU) or, on a CPU, the small CNN: ARCH=cnn bash pipeline.sh DATA
set -euo pipefail
data=${1:?usage: pipeline.sh DATA [WORKDIR]}
workdir=${2:-aabl-out}
arch=${ARCH:-resnet18}
aabl scan "$data" --arch "$arch" --workdir "$workdir"
# Exit 3 (after writing everything) if a backdoor is suspected; a clean set loses a quarter
# to a half of its images too, so the isolated share alone says little (docs/method.md).
aabl split --workdir "$workdir" --fail-on-suspect
aabl train --arch "$arch" --eps 8/255 --workdir "$workdir"
