"""Does each backdoor implant? A naive model per backdoor, its ACC and ASR.

    python benchmarks/backdoors.py TRAIN TEST --work DIR [--backdoors badnets,blend,...]
        [--epochs 20] [--arch cnn] [--device auto] [--md benchmarks/ATTACKS.md]

For every backdoor (and `none`, the clean subset, as the reference), through the real CLI:
  aabl poison TRAIN --backdoor B --out DIR/B/train         (timed: the generation time)
  aabl poison TEST  --backdoor B --test --out DIR/B/test   (iab/ssba reuse the trigger)
  aabl train  DIR/B/train --eps 0 --epochs 20 --arch cnn   (a naive model)
  aabl evaluate MODEL TEST --poisoned DIR/B/test --eps 0   (ACC on TEST, ASR)
`none` is evaluated on badnets' ASR set. Each backdoor's result is kept in
DIR/results.json as soon as it is done, and a rerun skips finished backdoors.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from cli_runner import aabl, device_name, publish

from aabl_cli.core.groundtruth import POISON_CSV
from aabl_cli.core.workdir import Workdir

BACKDOORS = ("none", "badnets", "blend", "blend-noise", "trojan", "wanet", "iab", "ssba", "clb")
VARIANTS = {"blend-noise": ["--backdoor", "blend", "--pattern", "noise"]}  # name -> poison options


def run_backdoor(backdoor: str, args: argparse.Namespace) -> dict[str, float | str]:
    base = args.work / backdoor
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    common = ["--device", args.device, "--cache-dir", args.work / "cache", "--quiet"]
    generation = 0.0
    train_dir, test_dir = args.train, args.work / "badnets" / "test"
    if backdoor != "none":
        train_dir, test_dir = base / "train", base / "test"
        t0 = time.perf_counter()
        chosen = VARIANTS.get(backdoor, ["--backdoor", backdoor])
        aabl("poison", args.train, *chosen, "--target", "0", "--out", train_dir,
             "--preview", base / "preview.png", "--seed", args.seed, *common)
        generation = time.perf_counter() - t0
        trigger = ["--trigger", train_dir / "trigger.safetensors"] if backdoor in ("iab", "ssba") else []
        aabl("poison", args.test, *chosen, "--target", "0", "--test", "--out", test_dir,
             "--seed", args.seed, *trigger, *common)
    t0 = time.perf_counter()
    wd = Workdir(base / "wd")
    aabl("train", train_dir, "--eps", "0", "--epochs", args.epochs, "--arch", args.arch, "--workdir", wd.root,
         "--seed", args.seed, *common)
    training = time.perf_counter() - t0
    result = json.loads(aabl("evaluate", wd.train.model, args.test,
                             "--poisoned", test_dir, "--eps", "0", "--device", args.device,
                             "--cache-dir", args.work / "cache", "--quiet"))
    poisoned = "-"
    if backdoor != "none":
        with open(train_dir / POISON_CSV, newline="") as fh:
            poisoned = str(sum(1 for row in csv.DictReader(fh) if row["poisoned"] == "1"))
    return {"backdoor": backdoor, "poisoned": poisoned, "generation_s": generation, "train_s": training,
            "acc": result["acc"], "asr": result["asr"], "device": device_name(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", type=Path, help="training image folder (e.g. a 10,000-image CIFAR-10 subset)")
    parser.add_argument("test", type=Path, help="test image folder (clean accuracy; its triggered copy gives ASR)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for poisoned sets and models")
    parser.add_argument("--backdoors", default=",".join(BACKDOORS), help="comma-separated; none = the clean subset")
    parser.add_argument("--epochs", default="20")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--md", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    backdoors = [b for b in args.backdoors.split(",") if b]
    if "none" in backdoors and "badnets" in backdoors:  # none borrows badnets' ASR set
        backdoors.remove("none")
        backdoors.insert(backdoors.index("badnets") + 1, "none")
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for backdoor in backdoors:
        if backdoor in results:
            continue
        print(f"{backdoor} ...", flush=True)
        results[backdoor] = run_backdoor(backdoor, args)
        print(json.dumps(results[backdoor]), flush=True)
        store.write_text(json.dumps(results, indent=2))

    lines = [f"### Naive `{args.arch}` models, {args.epochs} epochs", "",
             f"Training set `{args.train.name}`, test set `{args.test.name}`; target class 0; seed {args.seed}. "
             "Times are wall-clock seconds of the whole command on the device named in its row.", "",
             "| backdoor | poisoned images | generation (s) | naive training (s) | ACC | ASR | device |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for backdoor in (b for b in BACKDOORS if b in results):
        r = results[backdoor]
        lines.append(f"| {backdoor} | {r['poisoned']} | {r['generation_s']:.1f} | {r['train_s']:.1f} | "
                     f"{r['acc']:.1%} | {r['asr']:.1%} | {r.get('device', '?')} |")
    publish(lines, args.md)


if __name__ == "__main__":
    main()
