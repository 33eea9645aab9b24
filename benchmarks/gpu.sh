#!/usr/bin/env bash
# The GPU benchmarks, for a machine with a CUDA card:
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH speed [speed.py options]
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH backdoors
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH nccl
# speed:   benchmarks/speed.py on a 25,000-image CIFAR-10 subset (25,000 images for the naive
#          epoch and scoring, 10,000 for the AT epoch), appended to benchmarks/SPEED.md
# backdoors: benchmarks/backdoors.py on a 10,000-image subset, appended to benchmarks/ATTACKS.md
# nccl:    `aabl run` under torchrun with one process per GPU (the NCCL path) on a 2,000-image
#          subset, one epoch per stage; prints the backend each stage recorded, then runs the
#          CUDA-only tests
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
zip=$1 scratch=$2 what=$3
shift 3
mkdir -p "$scratch"
cd "$scratch"
[ -d cifar10 ] || python -m zipfile -e "$zip" .  # unzip may be missing
[ -d c25k ] || python "$here/benchmarks/subset.py" cifar10/train c25k --size 25000 --seed 0
[ -d c10k ] || python "$here/benchmarks/subset.py" cifar10/train c10k --size 10000 --seed 0
case $what in
  speed) python "$here/benchmarks/speed.py" c25k --device cuda --train-images 25000 --score-images 25000 \
           --at-images 10000 --workers 8 --cache-dir cache --md "$here/benchmarks/SPEED.md" "$@" ;;
  backdoors|attacks) python "$here/benchmarks/backdoors.py" c10k cifar10/test --work backdoors --device cuda \
             --md "$here/benchmarks/ATTACKS.md" "$@" ;;
  nccl) [ -d c2k ] || python "$here/benchmarks/subset.py" cifar10/train c2k --size 2000 --seed 0
        rm -rf nccl-run
        torchrun --standalone --nproc_per_node="${GPUS:-1}" -m aabl_cli run c2k --arch cnn --scan-epochs 1 \
          --train-epochs 1 --device cuda --workdir nccl-run --cache-dir cache
        python -c "import json; [print(s, json.load(open(f'nccl-run/{s}/{s}.json'))['settings']['distributed']) \
          for s in ('scan', 'train')]"
        (cd "$here" && python -m pytest -q tests/test_graphs.py tests/test_fuse.py tests/test_models.py) ;;
  *) echo "unknown: $what (speed, attacks or nccl)" >&2; exit 2 ;;
esac
