#!/usr/bin/env bash
# The real-data check of scan + split on CIFAR-10 (../shared/data): a seeded 10,000-image
# subset poisoned by BadNets (10 %, target 0), and the same subset clean.
#   bash benchmarks/split_check.sh [SCRATCH]      (about 15-20 min per scan on 2 CPU cores)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
scratch=${1:-$(mktemp -d)}
zip=${AABL_DATA:-$here/../shared/data}/cifar10-jpeg.zip
cd "$scratch"
[ -d cifar10 ] || unzip -q "$zip"
[ -d c10k ] || python "$here/benchmarks/subset.py" cifar10/train c10k --size 10000 --seed 0
[ -d c10test ] || python "$here/benchmarks/subset.py" cifar10/test c10test --size 2000 --seed 0
[ -d c10k-badnets ] || aabl poison c10k --attack badnets --rate 0.1 --target 0 --out c10k-badnets
[ -d c10test-badnets ] || aabl poison c10test --attack badnets --target 0 --test --out c10test-badnets
for name in badnets clean; do
  data=c10k-badnets; [ "$name" = clean ] && data=c10k
  /usr/bin/time -f "$name scan: %e s, %M KB peak" aabl scan "$data" --arch cnn --epochs 20 --workdir "wd-$name" \
    --cache-dir cache
  aabl split --workdir "wd-$name" --link none | tee "wd-$name/split.txt"
  aabl evaluate "wd-$name/scan/model.safetensors" c10test --poisoned c10test-badnets --eps 0 --cache-dir cache \
    --quiet --out "wd-$name/naive-eval.json"
done
echo "outputs in $scratch"
