#!/usr/bin/env bash
# The GPU benchmarks, for a machine with a CUDA card:
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH speed [speed.py options]
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH backdoors
#   bash benchmarks/gpu.sh CIFAR10_ZIP SCRATCH nccl
#   bash benchmarks/gpu.sh pack [CIFAR10_ZIP]    (where the data is, before going to the GPU machine)
#   bash benchmarks/gpu.sh proof [SCRATCH]
# speed:   benchmarks/speed.py on a 25,000-image CIFAR-10 subset (25,000 images for the naive
#          epoch and scoring, 10,000 for the AT epoch), appended to benchmarks/SPEED.md
# backdoors: benchmarks/backdoors.py on a 10,000-image subset, appended to benchmarks/ATTACKS.md
# nccl:    `aabl run` under torchrun with one process per GPU (the NCCL path) on a 2,000-image
#          subset, one epoch per stage; prints the backend each stage recorded, then runs the
#          CUDA-only tests
# pack:    gpu-data/cifar10-jpeg.zip in the checkout (git-ignored, 52 MiB; benchmarks/pack.py): every
#          training image and 200 test images a class of CIFAR10_ZIP (../shared/data/cifar10-jpeg.zip).
#          It is what `proof` needs from outside the checkout: take gpu-data along.
# proof:   benchmarks/reproduce.py --scale gpu-proof on gpu-data, in SCRATCH (/tmp/aabl-proof): clean,
#          BadNets, Blend and its control, WaNet and its control, one configuration at a time while it
#          fits in PROOF_BUDGET_S seconds (540, inside a 10-minute limit); a rerun skips finished ones.
#          Results go to benchmarks/results/gpu-proof/ and the tables of benchmarks/RESULTS.md; with
#          $OUT set, both and the log also to $OUT/proof.tar. Other settings (environment):
#          PROOF_SCALE (gpu-proof-tiny runs the same on a CPU in a minute), PROOF_DEVICE (cuda),
#          PROOF_CONFIGS (space-separated DATASET/BACKDOOR[/MODE]), PROOF_DATA (gpu-data, also
#          where pack writes), PROOF_RESULTS, PROOF_MD, PROOF_EST_AABL_S and PROOF_EST_CONTROL_S
#          (first guesses of a configuration's seconds, before one has run).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}  # this checkout's aabl_cli, installed or not
py=${PYTHON:-python3}
data=${PROOF_DATA:-$here/gpu-data}

if [ "${1:-}" = pack ]; then
  "$py" "$here/benchmarks/pack.py" "${2:-$here/../shared/data/cifar10-jpeg.zip}" "$data/cifar10-jpeg.zip" \
    --test-images 2000 --seed 0
  exit
fi

if [ "${1:-}" = proof ]; then
  scratch=${2:-/tmp/aabl-proof} scale=${PROOF_SCALE:-gpu-proof} device=${PROOF_DEVICE:-cuda}
  budget=${PROOF_BUDGET_S:-540} results=${PROOF_RESULTS:-$here/benchmarks/results}
  md=${PROOF_MD:-$here/benchmarks/RESULTS.md}
  # cheap and telling first; each control right after the A-ABL configuration whose kept set it trains
  read -ra configs <<< "${PROOF_CONFIGS:-cifar10/none cifar10/badnets cifar10/blend cifar10/blend/control \
cifar10/wanet cifar10/wanet/control}"
  if [ ! -f "$data/cifar10-jpeg.zip" ]; then
    echo "no $data/cifar10-jpeg.zip: run 'bash benchmarks/gpu.sh pack' where the data is and take gpu-data along" >&2
    exit 2
  fi
  mkdir -p "$scratch"
  log=$scratch/proof.log
  send_back() {  # on every exit, so a run stopped by its time limit still returns what it finished
    [ -n "${OUT:-}" ] || return 0
    local items=(-C "$scratch" proof.log)
    [ -d "$results/$scale" ] && items+=(-C "$(dirname "$results")" "$(basename "$results")/$scale")
    [ -f "$md" ] && items+=(-C "$(dirname "$md")" "$(basename "$md")")
    tar -cf "$OUT/proof.tar" "${items[@]}" && echo "results in $OUT/proof.tar"
  }
  trap send_back EXIT
  echo "proof at scale $scale on $device, $(date -u +%FT%TZ), budget ${budget}s" | tee -a "$log"
  # first guesses for an H100/H200 (docs/measurements.md); then the longest each kind took in this run
  declare -A est=([aabl]=${PROOF_EST_AABL_S:-240} [control]=${PROOF_EST_CONTROL_S:-90}) measured=()
  for i in "${!configs[@]}"; do
    config=${configs[i]} next=${configs[i + 1]:-}
    full=$config kind=aabl
    [[ $config == */*/* ]] || full=$config/aabl
    [[ $config == */control ]] && kind=control
    need=${est[$kind]}
    # a control trains the split its A-ABL run left in SCRATCH, which a fresh machine lacks: both in one run
    [[ $next == "$config/control" ]] && need=$((need + est[control]))
    if ((SECONDS + need > budget)); then
      echo "stopping before $full: ${SECONDS}s gone and about ${need}s more would pass the ${budget}s budget" \
        "(PROOF_BUDGET_S); run proof again to go on from here" | tee -a "$log"
      break
    fi
    t0=$SECONDS
    status=0
    "$py" "$here/benchmarks/reproduce.py" --scale "$scale" --only "$config" --data "$data" --work "$scratch" \
      --device "$device" --results "$results" --md "$md" 2>&1 | tee "$scratch/last.log" || status=$?
    cat "$scratch/last.log" >> "$log"
    if ((status)); then
      echo "$full failed (exit $status); what finished is kept, a rerun goes on from there" | tee -a "$log"
      exit "$status"
    fi
    if grep -q "^$full \.\.\." "$scratch/last.log"; then  # reproduce.py names what it runs, not what it skips
      took=$((SECONDS - t0))
      if [ -z "${measured[$kind]:-}" ] || ((took > est[$kind])); then est[$kind]=$took; fi
      measured[$kind]=1
      echo "$full: ${took}s" | tee -a "$log"
    else
      echo "$full: finished earlier" | tee -a "$log"
    fi
  done
  "$py" - "$results/$scale" "${configs[@]}" <<'EOF' | tee -a "$log"
import json
import sys
from pathlib import Path

store, configs = Path(sys.argv[1]), sys.argv[2:]
print(f"{'configuration':<24}{'min':>6}{'kept':>7}{'recall':>8}{'ACC':>7}{'RA':>7}{'ASR':>7}{'target':>8}")
for config in configs:
    dataset, backdoor, mode = (config.split("/") + ["aabl"])[:3]
    path = store / f"{dataset}-{backdoor}-{mode}.json"
    r = json.loads(path.read_text()) if path.exists() else {}
    name = f"{dataset}/{backdoor}/{mode}"
    if not r.get("finished"):
        print(f"{name:<24}not finished")
        continue
    cells = ["-" if r.get(k) is None else f"{100 * r[k]:.1f}"
             for k in ("kept_share", "recall", "acc", "ra", "asr", "target_rate")]
    minutes = r["seconds"].get("total", r["seconds"].get("train", 0)) / 60
    print(f"{name:<24}{minutes:>6.1f}{cells[0]:>7}{cells[1]:>8}" + "".join(f"{c:>7}" for c in cells[2:5])
          + f"{cells[5]:>8}")
EOF
  exit
fi

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
  *) echo "unknown: $what (speed, attacks or nccl; pack and proof come first)" >&2; exit 2 ;;
esac
