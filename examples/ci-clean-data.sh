#!/usr/bin/env bash
# A data-cleaning step for CI: scan a training folder, split off the suspicious images, and
# fail the job (exit 3) when a backdoor is suspected, or, with FAIL_OVER set, when more than
# that share of the set is isolated. Everything is written before a gate trips, so the job
# can still publish it:
#   WORKDIR/split/kept/      the cleaned folder (train on this)
#   WORKDIR/split/isolated/  what was cut away, for a person to look at
#   WORKDIR/split/split.json the verdict, gamma and per-class shares
#   WORKDIR/scan/scores.png  the score histogram with the threshold
#   WORKDIR/report.html      one page with all of it and the most suspicious images (aabl report)
#
#   DATA=./data bash examples/ci-clean-data.sh          (ARCH, EPOCHS, FAIL_OVER, WORKDIR optional)
#
# FAIL_OVER is off by default: the split isolates at least 10 % of any set, and a quarter to a
# half of clean CIFAR-10 and GTSRB (docs/method.md#the-ci-gates). Set it only as a budget for
# the data you can afford to lose, above what a known-clean version of your data isolates.
set -euo pipefail
data=${DATA:?set DATA to the image folder to clean}
workdir=${WORKDIR:-aabl-out}
arch=${ARCH:-cnn}           # cnn suits a CI runner's CPU; resnet18 wants a GPU
epochs=${EPOCHS:-20}
fail_over=${FAIL_OVER:-}
gates=(--fail-on-suspect)
if [ -n "$fail_over" ]; then
    gates+=(--fail-over "$fail_over")
fi

aabl scan "$data" --arch "$arch" --epochs "$epochs" --workdir "$workdir"
status=0
aabl split --workdir "$workdir" "${gates[@]}" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then
    exit "$status"  # the split itself failed: there is nothing to report
fi
# A tripped gate (exit 3) has written everything, and that is when a person wants the page:
# write it first, then fail with the gate's code.
aabl report "$workdir" --out "$workdir/report.html"
exit "$status"
