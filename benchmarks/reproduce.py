"""Reproduce the paper's Table 1 (splitting) and Table 3 (A-ABL, Adv. Train) on real data.

    python benchmarks/reproduce.py [--scale cpu|gpu] [--only cifar10/badnets,...] [--threads N]
        [--seeds 0,1,2] [--data ../shared/data] [--work scratch/reproduce] [--device auto] [--table-only]

Each configuration (dataset, backdoor, and `aabl` = the three stages, `advtrain` = adversarial
training on the whole poisoned set, no split, or `control` = the `aabl` configuration's kept set
trained the same way with `--eps 0`, which shows whether the adversarial training is what
suppresses a backdoor the split kept) runs through the real CLI:

    aabl poison TRAIN --backdoor B --out P/train ; aabl poison TEST --backdoor B --test --out P/test
    aabl scan P/train --epochs 20 ; aabl split ; aabl train (PGD) ; aabl evaluate (ACC, RA, ASR)

Every step is skipped when its output exists (an interrupted training resumes from its last
epoch), and each configuration's numbers go to benchmarks/results/<scale>/<dataset>-<backdoor>-<mode>.json
as soon as it finishes; a rerun skips finished configurations. So the benchmark can run
piece by piece, in the background, across sessions; results/ is committed. The tables in
benchmarks/RESULTS.md (between its `tables` markers) are rewritten from all result files.
`--refresh` re-derives finished configurations' numbers from their work directories (after
a change to the split or the evaluation), redoing only evaluations that lack a number.

`--seeds 0,1,2` runs each configuration once a seed. A seed picks which images are poisoned and
seeds the naive and the robust training; the train and test subsets of the real data stay the
same for every seed (subset seed 0), so the spread is the method's, not the sampling's. Seed 0
keeps the plain names (`<dataset>-<backdoor>-<mode>.json`, work directory `<dataset>/<backdoor>`),
seed N adds `-seedN`; the main tables show seed 0 and a table of mean +- std gathers every
configuration that ran under two seeds or more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from cli_runner import aabl, device_name

from aabl_cli.core.data import list_image_folder, peek_image_folder
from aabl_cli.core.device import cpu_has_native_bf16
from aabl_cli.core.settings import same, settings_for, stale_reason
from aabl_cli.core.workdir import Workdir, read_summary
from aabl_cli.stages.scan import scan, scan_settings
from aabl_cli.stages.train import train, train_settings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARK_BEGIN, MARK_END = "<!-- tables: begin -->", "<!-- tables: end -->"
SUBSET_SEED = 0  # the train and test subsets every seed shares

# name -> settings, a dict where they differ per dataset; `train_images` is split evenly over
# the classes (fewer where a class is small)
SCALES: dict[str, dict] = {
    # A 2-core CPU in at most 45 minutes a configuration: 20,000 CIFAR-10 images (all 10,000 of
    # GTSRB), bf16 on CPUs with AMX (2.7x), and the fast recipe: FGSM with a random start and a
    # one-cycle learning rate (Wong et al. 2020) with weight averaging. RESULTS.md says what it reaches.
    # CIFAR-10 trains 30 epochs: on BadNets' kept set 15 gave ACC 49.8 %, RA 30.5 %; 30 gave 61.6 %, 31.3 %.
    # 8 naive epochs, not the paper's 20: on 20,000 CIFAR-10 images a 20-epoch naive model makes many clean
    # images as robust as the poison (BadNets recall 71.5 %, rho_vul 3.96 %; 8 epochs: 90.2 %, 1.38 %).
    "cpu": {"arch": "cnn", "train_images": {"cifar10": 20000, "gtsrb": None},
            "test_images": {"cifar10": 1000, "gtsrb": 1075}, "scan_epochs": 8, "precision": "bf16",
            "train_epochs": {"cifar10": 30, "gtsrb": 30}, "adv_method": "fgsm-rs", "schedule": "onecycle",
            "ema": 0.995, "train_batch": 128, "train_lr": 0.2},
    # The earlier CPU scale: 4,000 images (4,300 of GTSRB), PGD-5 with the step schedule, float32.
    # Adversarial training barely left chance there (34-41 % ACC on CIFAR-10); its rows stay for comparison.
    "cpu-small": {"arch": "cnn", "train_images": {"cifar10": 4000, "gtsrb": 4300},
                  "test_images": {"cifar10": 1000, "gtsrb": 1075}, "scan_epochs": 20,
                  "train_epochs": {"cifar10": 20, "gtsrb": 40}, "train_steps": 5, "train_batch": 64,
                  "train_lr": 0.02},
    # The paper's recipe: ResNet-18, whole sets, 100 epochs of PGD-10 at batch 128.
    "gpu": {"arch": "resnet18", "train_images": {"cifar10": 50000, "gtsrb": 10000},
            "test_images": {"cifar10": 10000, "gtsrb": 5000}, "scan_epochs": 20, "train_epochs": 100,
            "train_steps": 10, "train_batch": 128, "train_lr": 0.1},
    # `bash benchmarks/gpu.sh proof`: every CIFAR-10 training image and ResNet-18 with the fast recipe, so a
    # configuration takes minutes on one H100/H200 (docs/measurements.md). 2,000 test images, all that
    # `gpu.sh pack` takes along. lr 0.4 is aabl train's own for batch 512 (0.1 per 128). 4 naive epochs,
    # not the paper's 20: the scan trains at batch 128, 2.4-4.3x slower per image than batch 512 on an H100
    # (SPEED.md), and a longer naive training made the split worse on the cpu scale (20,000 images: recall
    # 90.2 % after 8 epochs, 1,250 Adam steps, 71.5 % after 20); 4 epochs of 50,000 images are 1,560 steps.
    "gpu-proof": {"arch": "resnet18", "train_images": None, "test_images": 2000, "scan_epochs": 4,
                  "precision": "bf16", "train_epochs": 30, "adv_method": "fgsm-rs", "schedule": "onecycle",
                  "ema": 0.995, "train_batch": 512, "train_lr": 0.4},
    # The proof's pipeline on a CPU in about a minute (its test): 200 images, a small CNN, one epoch a stage.
    "gpu-proof-tiny": {"arch": "cnn", "train_images": 200, "test_images": 100, "scan_epochs": 1, "train_epochs": 1,
                       "adv_method": "fgsm-rs", "schedule": "onecycle", "ema": 0.995, "train_batch": 64,
                       "train_lr": 0.05},
}
ZIPS = {"cifar10": ("cifar10-jpeg.zip", "cifar10"), "gtsrb": ("gtsrb32-png.zip", "gtsrb32")}
# how the tables name each mode, in the order they show them
METHODS = {"aabl": "A-ABL", "pgd": "A-ABL, paper's PGD-10 recipe", "control": "Control (kept set, --eps 0)",
           "advtrain": "Adv. Train"}
# Modes that train the kept set of the configuration's `aabl` run, and what they change in its recipe:
# `pgd` the paper's (PGD-10, step schedule, lr 0.1, no averaging) for the recipes side by side,
# `control` no attack at all.
ON_KEPT_SET = {"pgd": {"steps": 10, "adv_method": None, "schedule": None, "ema": None, "lr": 0.1},
               "control": {"eps": 0}}
CATEGORY = {"none": "-", "badnets": "A", "trojan": "A", "clb": "A", "iab": "A", "blend": "B", "wanet": "B",
            "ssba": "B"}
# cheap and telling first: a category A, clean, a category B, then the rest
CONFIGS = [("cifar10", "badnets", "aabl"), ("cifar10", "none", "aabl"), ("cifar10", "blend", "aabl"),
           ("cifar10", "badnets", "advtrain"), ("cifar10", "trojan", "aabl"), ("cifar10", "wanet", "aabl"),
           ("gtsrb", "badnets", "aabl"), ("gtsrb", "none", "aabl"), ("gtsrb", "blend", "aabl"),
           ("cifar10", "blend", "advtrain"), ("cifar10", "clb", "aabl"), ("cifar10", "iab", "aabl"),
           ("cifar10", "ssba", "aabl")]
# The cpu scale's: the sets robust training is measured on (clean and BadNets on both datasets), the
# category B backdoors with the rows that test the method's second half (the control and plain adversarial
# training beside A-ABL), and the paper's PGD-10 recipe beside the fast one; cheap and telling first. GTSRB
# WaNet has no second-half rows: its naive model did not learn the warp (ASR 31.2 %, target rate 7.4 %).
SCALE_CONFIGS = {"cpu": [("cifar10", "badnets", "aabl"), ("gtsrb", "blend", "aabl"), ("gtsrb", "blend", "control"),
                         ("gtsrb", "wanet", "aabl"), ("gtsrb", "ssba", "aabl"), ("gtsrb", "ssba", "control"),
                         ("gtsrb", "ssba", "advtrain"),
                         ("cifar10", "ssba", "aabl"), ("cifar10", "ssba", "control"), ("gtsrb", "badnets", "aabl"),
                         ("cifar10", "none", "aabl"), ("gtsrb", "none", "aabl"), ("cifar10", "blend", "aabl"),
                         ("cifar10", "wanet", "aabl"), ("gtsrb", "blend", "advtrain"),
                         ("cifar10", "ssba", "advtrain"), ("cifar10", "blend", "control"),
                         ("cifar10", "wanet", "control"), ("cifar10", "badnets", "pgd"), ("gtsrb", "blend", "pgd")]}


def configs_of(scale: str) -> list[tuple[str, str, str]]:
    """The configurations `scale` runs by default, in order."""
    return SCALE_CONFIGS.get(scale, CONFIGS)

# The paper's numbers (%): Table 1 (gamma, rho_vul) and Table 3 (ACC, ASR, RA), ResNet-18.
PAPER_SPLIT = {
    "cifar10": {"none": (90.00, None), "badnets": (82.34, 0.13), "trojan": (76.98, 0.06), "clb": (84.78, 0.00),
                "iab": (82.79, 0.32), "blend": (90.00, 10.04), "ssba": (90.00, 10.49), "wanet": (86.27, 11.52)},
    "gtsrb": {"none": (49.36, None), "badnets": (55.83, 0.00), "blend": (73.37, 6.71)},
}
PAPER_AABL = {
    "cifar10": {"none": (83.77, None, 46.11), "badnets": (83.59, 1.26, 46.63), "trojan": (83.32, 1.44, 46.39),
                "clb": (83.98, 0.59, 47.96), "iab": (83.51, 6.88, 46.09), "blend": (82.68, 2.59, 47.72),
                "ssba": (82.89, 4.94, 47.62), "wanet": (80.34, 3.31, 47.64)},
    "gtsrb": {"none": (87.43, None, 61.82), "badnets": (88.65, 0.01, 60.09), "blend": (88.71, 1.65, 62.20)},
}
PAPER_ADVTRAIN = {
    "cifar10": {"none": (83.47, None, 45.32), "badnets": (83.72, 100.00, 46.28), "blend": (82.81, 3.37, 46.22)},
    "gtsrb": {"none": (89.27, None, 62.43), "badnets": (89.44, 100.00, 62.24), "blend": (89.17, 13.73, 62.45)},
}


def seeded(name: str, seed: object) -> str:
    """`name` as seed `seed` stores it: seed 0 plain, seed N with `-seedN` (results and work directories)."""
    return name if int(seed) == 0 else f"{name}-seed{int(seed)}"


def result_name(dataset: str, backdoor: str, mode: str, seed: object) -> str:
    """The result file of a configuration under `seed`."""
    return seeded(f"{dataset}-{backdoor}-{mode}", seed) + ".json"


def settings(scale: str, dataset: str) -> dict:
    """The settings of `scale` for `dataset`."""
    return {k: v[dataset] if isinstance(v, dict) else v for k, v in SCALES[scale].items()}


# A result records the images it actually trained on under `train_images`, not the scale's request, and the
# arithmetic it ran in under `precision` (`machine_precision`): bf16 and float32 differ by rounding only.
MEASURED = ("train_images", "precision")
# Keys results of earlier versions wrote, and their names now.
RENAMED = {"attack": "backdoor", "gamma": "kept_share"}


def machine_precision(scale: dict, device: str) -> dict:
    """`scale` as this machine runs it: a CPU without bf16 instructions would emulate bf16 many times slower
    than float32 (`aabl_cli.core.device.warn_if_emulated_bf16`), so there the scale runs in fp32."""
    if scale.get("precision") != "bf16" or (device != "cpu" and torch.cuda.is_available()):
        return scale
    if cpu_has_native_bf16() is not False:
        return scale
    return {**scale, "precision": "fp32"}


def is_current(result: dict, scale: str) -> bool:
    """Whether a stored result ran with every setting `scale` now gives its dataset."""
    wanted = settings(scale, result["dataset"])
    return all(same(result.get(k), v) for k, v in wanted.items() if k not in MEASURED)


def load_result(path: Path) -> dict:
    """A stored result, its keys as this version names them."""
    stored = json.loads(path.read_text())
    result = {RENAMED.get(k, k): v for k, v in stored.items()}
    if isinstance(result.get("precision"), float):  # earlier files: the isolated set's precision, a share
        result["isolated_precision"] = result.pop("precision")
    return result


def scan_options(scale: dict, args: argparse.Namespace) -> dict:
    """The options `aabl scan` runs with at `scale` (besides where and how: --device, --cache-dir, ...)."""
    precision = {"precision": scale["precision"]} if "precision" in scale else {}
    return {"arch": scale["arch"], "epochs": scale["scan_epochs"], **precision, "seed": int(args.seed)}


def train_options(scale: dict, args: argparse.Namespace) -> dict:
    """The options `aabl train` runs with at `scale`: the recipe's settings a scale names (steps for PGD,
    the fast recipe's method, schedule and weight averaging, the precision), the rest `aabl train`'s defaults."""
    recipe = {name: scale[key] for name, key in (("steps", "train_steps"), ("adv_method", "adv_method"),
                                                  ("schedule", "schedule"), ("ema", "ema"),
                                                  ("precision", "precision")) if key in scale}
    return {"arch": scale["arch"], "epochs": scale["train_epochs"], **recipe, "batch_size": scale["train_batch"],
            "lr": scale["train_lr"], "seed": int(args.seed)}


def recipe_options(options: dict, mode: str) -> dict:
    """`options` (the scale's training) as `mode` changes them; a change to None drops the option."""
    changed = {**options, **ON_KEPT_SET.get(mode, {})}
    return {name: value for name, value in changed.items() if value is not None}


def flags(options: dict) -> list:
    """`options` as the command line's flags: {"batch_size": 64} -> ["--batch-size", 64]."""
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", value)]


def stale(stage_json: Path, data: Path, stage, settings_of, options: dict) -> str | None:
    """None when `stage_json` records what the stage would record for `options` on `data` (the stage's own
    settings function, the same comparison as `aabl run`); else why it is stale."""
    fingerprint, _, size = peek_image_folder(data)
    wanted = settings_for(stage, settings_of, options, data=data, image_size=size, distributed={"world_size": 1})
    return stale_reason(stage_json, wanted, fingerprint)


def set_aside_stale_training(wd: Path, data: Path, options: dict) -> None:
    """A finished training of `data` with other settings than `options` give is moved to `train-<N>ep`
    (N its epochs, its evaluation beside it), so the configuration trains afresh and nothing measured is lost."""
    done = Workdir(wd).train
    if not done.json.exists() or stale(done.json, data, train, train_settings, options) is None:
        return
    epochs = read_summary(done.json, "train")["settings"]["epochs"]
    done.path.rename(wd / f"train-{epochs}ep")
    if (wd / "final-eval.json").exists():
        (wd / "final-eval.json").rename(wd / f"final-eval-{epochs}ep.json")


def unzip_once(archive: Path, raw: Path, top: str) -> Path:
    """`raw/top`, the folder `top` of the zip `archive`, extracted once. It is extracted into a temporary
    sibling and renamed when whole, so an interrupted extraction is never taken for the data."""
    if not (raw / top).exists():
        tmp = raw / f".{top}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(tmp)
        (tmp / top).rename(raw / top)
        shutil.rmtree(tmp)
    return raw / top


def prepare_data(dataset: str, args: argparse.Namespace, scale: dict) -> tuple[Path, Path]:
    """Seeded, class-balanced train and test subsets of the real data, made once."""
    zip_name, top = ZIPS[dataset]
    unzip_once(args.data / zip_name, args.work / "raw", top)
    raw = args.work / "raw"
    base = args.work / args.scale / dataset
    folders = []
    for part, size in (("train", scale["train_images"]), ("test", scale["test_images"])):
        folder = base / part
        if not folder.exists():
            tmp = base / f".{part}.tmp"
            subprocess.run([sys.executable, str(HERE / "subset.py"), raw / top / part, tmp, "--size", str(size or 0),
                            "--seed", str(SUBSET_SEED)], check=True, capture_output=True)
            tmp.rename(folder)
        folders.append(folder)
    return folders[0], folders[1]


def poison(backdoor: str, train: Path, test: Path, base: Path,
           args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The poisoned training folder and its ASR set (`none`: the clean folder, no ASR set)."""
    if backdoor == "none":
        return train, None
    common = ["--target", "0", "--seed", args.seed, "--device", args.device, "--cache-dir", args.work / "cache",
              "--quiet"]
    p_train, p_test = base / "poisoned-train", base / "poisoned-test"
    if not p_train.exists():  # poison writes to a temporary sibling, so an existing folder is complete
        aabl("poison", train, "--backdoor", backdoor, "--out", p_train, "--preview", base / "preview.png", *common,
             threads=args.threads)
    if not p_test.exists():
        trigger = ["--trigger", p_train / "trigger.safetensors"] if backdoor in ("iab", "ssba") else []
        aabl("poison", test, "--backdoor", backdoor, "--test", "--out", p_test, *trigger, *common, threads=args.threads)
    return p_train, p_test


def evaluate(model: Path, test: Path, poisoned: Path | None, out: Path, args: argparse.Namespace, *,
             robust: bool, attack: str = "pgd") -> dict:
    # an evaluation from before `target_rate` existed is redone (it costs seconds, a training hours)
    if not out.exists() or (poisoned and "target_rate" not in json.loads(out.read_text())):
        extra = ["--poisoned", poisoned] if poisoned else []
        aabl("evaluate", model, test, *extra, *([] if robust else ["--eps", "0"]), "--attack", attack,
             "--device", args.device, "--cache-dir", args.work / "cache", "--quiet", "--out", out,
             threads=args.threads)
    return json.loads(out.read_text())


def strong_ra(model: Path, test: Path, wd: Path, args: argparse.Namespace) -> dict:
    """RA of the final model under `--strong-attack` (its evaluation kept beside the PGD one), as the
    result's keys; nothing without the option."""
    attack = getattr(args, "strong_attack", None)
    if not attack:
        return {}
    strong = evaluate(model, test, None, wd / f"final-eval-{attack}.json", args, robust=True, attack=attack)
    return {"ra_strong": strong["ra"], "strong_attack": strong["attack"]}


def run_config(dataset: str, backdoor: str, mode: str, args: argparse.Namespace, *,
               on_split: Callable[[dict], None] = lambda result: None) -> dict:
    """Run one configuration; `on_split` gets the numbers known after the split (Table 1's)."""
    scale = machine_precision(settings(args.scale, dataset), args.device)
    train_data, test = prepare_data(dataset, args, scale)
    base = args.work / args.scale / dataset / seeded(backdoor, args.seed)
    base.mkdir(parents=True, exist_ok=True)
    p_train, p_test = poison(backdoor, train_data, test, base, args)
    wd = Workdir(base / mode)
    run = ["--device", args.device, "--cache-dir", args.work / "cache", "--quiet", "--workdir", wd.root]
    seconds: dict[str, float] = {}
    result: dict = {"dataset": dataset, "backdoor": backdoor, "category": CATEGORY[backdoor], "mode": mode,
                    "scale": args.scale, **scale, "train_images": len(list_image_folder(p_train).files),
                    "seed": args.seed}
    if mode == "aabl":
        if not wd.scan.json.exists():
            t0 = time.perf_counter()
            aabl("scan", p_train, *flags(scan_options(scale, args)), "--resume", *run, threads=args.threads)
            seconds["scan"] = time.perf_counter() - t0
        elif why := stale(wd.scan.json, p_train, scan, scan_settings, scan_options(scale, args)):
            # split and training stand on the scan: it is not reused under other settings' name
            raise SystemExit(f"{wd.scan.path} ran with other settings than the {args.scale} scale's; remove "
                             f"{wd.root} (or pass another --work) to run this configuration again ({why})")
        if not wd.split.json.exists():
            aabl("split", "--workdir", wd.root, "--quiet", threads=args.threads)
        split = wd.read("split")
        truth = split.get("ground_truth") or {}
        naive = evaluate(wd.scan.model, test, p_test, wd.root / "naive-eval.json", args, robust=False)
        result.update(kept_share=split["kept_share"], rho_vul=truth.get("rho_vul"), recall=truth.get("recall"),
                      isolated_precision=truth.get("precision"), verdict=split["verdict"],
                      suspected_class=split.get("suspected_class"), naive_acc=naive["acc"],
                      naive_asr=naive.get("asr"), naive_target_rate=naive.get("target_rate"))
        on_split({**result, "seconds": dict(seconds), "finished": False})
        kept = wd.split.kept
    elif mode in ON_KEPT_SET:  # the A-ABL kept set, trained with another recipe
        split_of = Workdir(base / "aabl").split
        if not split_of.json.exists():
            raise SystemExit(f"{dataset}/{backdoor}/{mode} trains the kept set of {dataset}/{backdoor}/aabl: "
                             "run that first")
        kept = split_of.kept
    else:
        kept = p_train
    options = recipe_options(train_options(scale, args), mode)
    set_aside_stale_training(wd.root, kept, options)
    if not wd.train.json.exists():
        t0 = time.perf_counter()
        aabl("train", kept, *flags(options), "--resume", *run, threads=args.threads)
        seconds["train"] = time.perf_counter() - t0
    else:  # trained by an earlier run (or by hand, with the same command): its own time
        seconds["train"] = wd.read("train")["seconds"]["total"]
    history = wd.train.history.read_text().splitlines()
    final = evaluate(wd.train.model, test, p_test, wd.root / "final-eval.json", args, robust=True)
    result.update(strong_ra(wd.train.model, test, wd.root, args))
    result.update(acc=final["acc"], ra=final["ra"], asr=final.get("asr"), target_rate=final.get("target_rate"),
                  train_history=history, seconds=seconds, device=device_name(args.device), torch=_torch_version(),
                  threads=args.threads, date=datetime.date.today().isoformat(), finished=True)
    return result


def _recipe(result: dict) -> str:
    """The adversarial training a result ran, in words."""
    if result.get("adv_method") == "fgsm-rs":
        words = "FGSM-RS adversarial training"
    else:
        words = f"PGD-{result.get('train_steps', 10)} adversarial training"
    extras = [f"{result['schedule']} schedule" if result.get("schedule") else "step schedule"]
    if result.get("ema"):
        extras.append(f"weight averaging {result['ema']}")
    if result.get("precision"):
        extras.append(result["precision"])
    return f"{words} ({', '.join(extras)})"


def _torch_version() -> str:
    import torch

    return torch.__version__


def pct(value: float | None, digits: int = 1) -> str:
    """A share as a percentage for the benchmark pages' tables; "-" for none (or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"




def _train_minutes(result: dict) -> str:
    """A result's training time in whole minutes, "-" when it has none."""
    seconds = result["seconds"].get("train")
    return "-" if seconds is None else f"{seconds / 60:.0f}"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(scale: str) -> str:
    """The Markdown tables of every finished configuration at `scale`."""
    stored = [load_result(p) for p in sorted((RESULTS / scale).glob("*.json"))]
    # shown by dataset, method, then category (clean, A, B) in the paper's order of backdoors
    backdoors = list(CATEGORY)
    stored.sort(key=lambda r: (list(ZIPS).index(r["dataset"]), list(METHODS).index(r["mode"]),
                               backdoors.index(r["backdoor"]), int(r.get("seed", 0))))
    every = [r for r in stored if int(r.get("seed", 0)) == 0]  # the main tables: seed 0
    aabl_rows = [r for r in every if r["mode"] == "aabl"]  # split numbers exist before training ends
    rows = [r for r in every if r.get("finished")]
    lines = [f"### Scale `{scale}`: {len(rows)} of {len(configs_of(scale))} configurations finished", "",
             "**Splitting (Table 1)**, ours beside the paper's (ResNet-18, whole sets); recall = share of the poison "
             "isolated; naive = the scan's model (no defence); target rate = clean non-target test "
             "images classified as the target, ASR's baseline without a trigger.", "",
             "| data | backdoor | cat. | gamma | rho_vul | recall | verdict | naive ACC | naive ASR "
             "| naive target rate | paper gamma | paper rho_vul |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in aabl_rows:
        g, rv = PAPER_SPLIT.get(r["dataset"], {}).get(r["backdoor"], (None, None))
        lines.append(f"| {r['dataset']} | {r['backdoor']} | {r['category']} | {pct(r['kept_share'])} | "
                     f"{pct(r['rho_vul'], 2)} | {pct(r['recall'])} | {r['verdict']} | {pct(r['naive_acc'])} | "
                     f"{pct(r['naive_asr'])} | {pct(r.get('naive_target_rate'))} | {_paper(g)} | {_paper(rv)} |")
    lines += ["", "**Final models (Table 3)**: A-ABL = split + adversarial training on the kept set; Control = the "
              "same kept set and recipe without the attack (`--eps 0`); Adv. Train = adversarial training on the "
              "whole poisoned set. RA under PGD-10 (8/255, step 2/255); ASR on the non-target test images, "
              "triggered.", "",
              "| data | backdoor | method | ACC | RA | ASR | target rate | paper ACC | paper RA | paper ASR "
              "| epochs | train (min) |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        paper = {"aabl": PAPER_AABL, "advtrain": PAPER_ADVTRAIN}.get(r["mode"], {}).get(r["dataset"], {}).get(
            r["backdoor"])
        acc, asr, ra = paper or (None, None, None)
        lines.append(f"| {r['dataset']} | {r['backdoor']} | {METHODS[r['mode']]} | "
                     f"{pct(r['acc'])} | {pct(r['ra'])} | {pct(r['asr'])} | {pct(r.get('target_rate'))} | "
                     f"{_paper(acc)} | {_paper(ra)} | "
                     f"{_paper(asr)} | {r['train_epochs']} | {_train_minutes(r)} |")
    if rows:
        first = rows[0]
        lines += ["", f"Settings: `{first['arch']}`, {first['scan_epochs']} naive epochs (Adam), then "
                  f"{_recipe(first)} for the epochs shown (SGD, batch {first['train_batch']}, "
                  f"lr {first.get('train_lr', '?')}), seed {first['seed']}; device {first['device']}, "
                  f"torch {first['torch']}."]
    in_fp32 = [f"{r['dataset']}/{r['backdoor']}/{r['mode']}" for r in rows
               if r.get("precision") == "fp32" and SCALES[scale].get("precision") == "bf16"]
    if in_fp32:
        lines += float32_note("Ran", ", ".join(in_fp32))
    lines += second_half(rows)
    lines += recipes_side_by_side(rows)
    lines += spread([r for r in stored if r.get("finished")])
    lines += under_strong_attack(rows)
    done = {(r["dataset"], r["backdoor"], r["mode"]) for r in rows}
    missing = [f"{d}/{a}/{m}" for d, a, m in configs_of(scale) if (d, a, m) not in done]
    if missing:
        lines += ["", f"Not yet run at this scale: {', '.join(missing)}."]
    outdated = [f"{r['dataset']}/{r['backdoor']}/{r['mode']}" for r in rows if not is_current(r, scale)]
    if outdated:
        lines += ["", "Ran with settings this scale no longer gives (a rerun trains them again): "
                  f"{', '.join(outdated)}."]
    return "\n".join(lines) + "\n"


def _lift(result: dict | None, prefix: str = "") -> float | None:
    """ASR minus the target rate (a backdoor's effect above what the model gives the target anyway)."""
    if result is None or result.get(f"{prefix}asr") is None or result.get(f"{prefix}target_rate") is None:
        return None
    return result[f"{prefix}asr"] - result[f"{prefix}target_rate"]


def second_half(rows: list[dict]) -> list[str]:
    """The table that tells whether adversarial training suppresses a backdoor the split kept: for each
    category B configuration with a finished A-ABL row, the naive model's lift (ASR minus target rate),
    A-ABL's, the control's (the kept set without the attack) and plain adversarial training's."""
    by = {(r["dataset"], r["backdoor"], r["mode"]): r for r in rows}
    keys = [(d, b) for d, b, m in by if m == "aabl" and CATEGORY[b] == "B"]
    if not keys:
        return []
    lines = ["", "**The second half (category B)**: ASR minus target rate, in points. The split keeps most of "
             "these backdoors' poison; A-ABL's claim is that the adversarial training then suppresses them "
             "(goal: at most 5). The control trains the same kept set the same way without the attack and must "
             "keep the backdoor (at least 40) for the A-ABL row to show anything.", "",
             "| data | backdoor | poison kept (1 - recall) | naive | A-ABL | control (--eps 0) | Adv. Train "
             "| reading |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for d, b in keys:
        aabl_row, control, adv = by[(d, b, "aabl")], by.get((d, b, "control")), by.get((d, b, "advtrain"))
        naive, ours, ctrl, plain = (_lift(aabl_row, "naive_"), _lift(aabl_row), _lift(control), _lift(adv))
        kept = None if aabl_row.get("recall") is None else 1 - aabl_row["recall"]
        lines.append(f"| {d} | {b} | {pct(kept)} | {pct(naive)} | {pct(ours)} | {pct(ctrl)} | {pct(plain)} "
                     f"| {_reading(naive, ours, ctrl)} |")
    return lines


def recipes_side_by_side(rows: list[dict]) -> list[str]:
    """The fast recipe (the scale's) beside the paper's PGD-10 recipe on the same kept set, for each
    configuration that ran both: the fast one is worth recommending within 2 points of PGD's RA and
    ASR at a third of its training time or less."""
    by = {(r["dataset"], r["backdoor"], r["mode"]): r for r in rows}
    pairs = [(d, b) for d, b, m in by if m == "pgd" and (d, b, "aabl") in by]
    if not pairs:
        return []
    lines = ["", "**Recipes side by side** on the same kept set: the scale's fast recipe (A-ABL row) against the "
             "paper's PGD-10 recipe (step schedule, lr 0.1, no averaging), the same epochs. Goal for the fast "
             "one: RA and ASR within 2 points of PGD's at a third of its training time or less.", "",
             "| data | backdoor | recipe | ACC | RA | ASR | target rate | train (min) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for d, b in pairs:
        fast, pgd = by[(d, b, "aabl")], by[(d, b, "pgd")]
        for name, r in (("fast: " + _recipe(fast), fast), ("paper: PGD-10, step schedule", pgd)):
            lines.append(f"| {d} | {b} | {name} | {pct(r['acc'])} | {pct(r['ra'])} | {pct(r.get('asr'))} | "
                         f"{pct(r.get('target_rate'))} | {_train_minutes(r)} |")
        t_fast, t_pgd = fast["seconds"].get("train"), pgd["seconds"].get("train")
        ratio = f"{t_fast / t_pgd:.2f}" if t_fast and t_pgd else "-"
        d_asr = "-" if fast.get("asr") is None or pgd.get("asr") is None else pct(fast["asr"] - pgd["asr"])
        lines.append(f"| {d} | {b} | fast minus paper (time: ratio) | {pct(fast['acc'] - pgd['acc'])} | "
                     f"{pct(fast['ra'] - pgd['ra'])} | {d_asr} | | {ratio} |")
    return lines


def under_strong_attack(rows: list[dict]) -> list[str]:
    """RA under the stronger attack beside RA under PGD-10, for every final model measured under both."""
    measured = [r for r in rows if r.get("ra_strong") is not None]
    if not measured:
        return []
    lines = ["", "**Robust accuracy under a stronger attack** (`reproduce.py --strong-attack`, `aabl evaluate "
             "--attack`): the same final models and test images at the same budget. autoattack is APGD-CE then "
             "APGD-T (targeted DLR, 9 targets), 100 iterations each, the white-box part of AutoAttack's standard "
             "version; apgd is APGD-CE alone.", "",
             "| data | backdoor | method | RA (PGD-10) | attack | RA (attack) | difference |",
             "| --- | --- | --- | ---: | --- | ---: | ---: |"]
    for r in measured:
        name = r["strong_attack"]["name"] if isinstance(r.get("strong_attack"), dict) else r.get("strong_attack")
        lines.append(f"| {r['dataset']} | {r['backdoor']} | {METHODS[r['mode']]} | {pct(r['ra'])} | {name} | "
                     f"{pct(r['ra_strong'])} | {pct(r['ra_strong'] - r['ra'])} |")
    return lines


def _mean_std(values: list[float | None]) -> str:
    """Percentages as `mean ± std` (sample standard deviation), "-" when any is missing."""
    if not values or any(v is None for v in values):
        return "-"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def spread(rows: list[dict]) -> list[str]:
    """Mean ± std over seeds for each configuration that finished under two seeds or more."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["backdoor"], r["mode"]), []).append(r)
    groups = {key: runs for key, runs in groups.items() if len({int(r["seed"]) for r in runs}) >= 2}
    if not groups:
        return []
    lines = ["", "**Spread over seeds**: mean ± standard deviation (sample) over the seeds listed. A seed picks "
             "the poisoned images and seeds the naive and the robust training; every seed trains on the same "
             "subsets of the real data and is measured on the same test images.", "",
             "| data | backdoor | method | seeds | gamma | rho_vul | recall | ACC | RA | ASR | target rate |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (d, b, m), runs in groups.items():
        seeds = ",".join(str(int(r["seed"])) for r in runs)
        split_cols = [_mean_std([r.get(k) for r in runs]) if m == "aabl" else "-"
                      for k in ("kept_share", "rho_vul", "recall")]
        model_cols = [_mean_std([r.get(k) for r in runs]) for k in ("acc", "ra", "asr", "target_rate")]
        lines.append(f"| {d} | {b} | {METHODS[m]} | {seeds} | " + " | ".join(split_cols + model_cols) + " |")
    return lines


def _reading(naive: float | None, ours: float | None, control: float | None) -> str:
    """What a row of the second-half table shows, by the thresholds its caption states."""
    if naive is None or ours is None:
        return "-"
    if naive < 0.60:
        return "backdoor did not implant in the naive model: shows nothing"
    if control is None:
        return "control not run yet"
    if control < 0.40:
        return "control lost the backdoor too: shows nothing about adversarial training"
    return "suppressed by adversarial training" if ours <= 0.05 else "NOT suppressed: the claim fails here"


def refreshed(stored: dict, fresh: dict) -> dict:
    """`stored` with the numbers of `fresh`, a rerun whose steps were all skipped: the stored run's
    times, date and machine stay."""
    keep = ("seconds", "date", "threads", "device", "torch", "train_history")
    return {**stored, **{k: v for k, v in fresh.items() if k not in keep}}


def replace_tables(path: Path, tables: str, title: str) -> None:
    """Put `tables` between the `tables` markers of the Markdown file `path`, keeping the text around them;
    a missing file is made with `title` as its heading (every benchmark page is written this way)."""
    text = path.read_text() if path.exists() else f"# {title}\n\n{MARK_BEGIN}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_BEGIN)
    _, _, tail = rest.partition(MARK_END)
    path.write_text(f"{head}{MARK_BEGIN}\n{tables}{MARK_END}{tail}")


def float32_note(done: str, names: str) -> list[str]:
    """The lines that say which rows ran in float32 where their scale asks bf16 (`machine_precision`)."""
    return ["", f"{done} in float32, on a CPU without bf16 instructions (where bf16 would be emulated many times "
            f"slower; the numbers differ from bf16's by rounding only): {names}."]


def write_markdown(path: Path, scales: list[str]) -> None:
    tables = "\n".join(render(s) for s in scales if (RESULTS / s).exists())
    replace_tables(path, tables, "Reproducing the paper's tables")


def main() -> None:
    global RESULTS  # --results: where this run stores results and render and write_markdown read them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--only", default="", help="comma-separated DATASET/BACKDOOR[/MODE] (MODE aabl by default)")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=HERE.parent / "scratch" / "reproduce")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", default="0", help="the seed of a single run (see --seeds)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: each configuration runs once a seed (default: --seed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per command (default: all)")
    parser.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files, one per scale")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the tables from the results")
    parser.add_argument("--strong-attack", choices=["apgd", "autoattack"], default=None,
                        help="also measure each final model's RA under this attack of aabl evaluate (with "
                             "--refresh: the finished configurations' too)")
    parser.add_argument("--refresh", action="store_true",
                        help="re-derive finished configurations' numbers from their work directories (after "
                             "an evaluation or split change), redoing only evaluations that lack a number")
    args = parser.parse_args()
    RESULTS = args.results
    try:
        seeds = [str(int(seed)) for seed in (args.seeds or args.seed).split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, not {args.seeds or args.seed!r}")
    if not seeds or len(set(seeds)) != len(seeds) or any(int(seed) < 0 for seed in seeds):
        parser.error(f"--seeds needs distinct seeds of 0 or more, not {args.seeds or args.seed!r}")
    configs = configs_of(args.scale)
    if args.only:
        wanted = [(tuple(item.split("/")) + ("aabl",))[:3] for item in args.only.split(",") if item]
        unknown = [c for c in wanted if c[0] not in ZIPS or c[1] not in CATEGORY or c[2] not in METHODS]
        if unknown:
            parser.error(f"unknown configuration {'/'.join(unknown[0])}: datasets {', '.join(ZIPS)}; backdoors "
                         f"{', '.join(CATEGORY)}; modes {', '.join(METHODS)}")
        configs = [c for c in wanted if c in configs] + [c for c in wanted if c not in configs]
    out_dir = RESULTS / args.scale
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [] if args.table_only else [(config, seed) for config in configs for seed in seeds]
    for (dataset, backdoor, mode), seed in runs:
        args.seed = seed  # run_config and the options it builds read the seed from args
        store = out_dir / result_name(dataset, backdoor, mode, seed)
        name = f"{dataset}/{backdoor}/{mode}" + (f" seed {seed}" if len(seeds) > 1 else "")
        stored = load_result(store) if store.exists() else {}
        if stored.get("finished") and is_current(stored, args.scale):
            work = args.work / args.scale / dataset / seeded(backdoor, seed) / mode
            if args.refresh and Workdir(work).train.json.exists():
                fresh = run_config(dataset, backdoor, mode, args)
                store.write_text(json.dumps(refreshed(stored, fresh), indent=2) + "\n")
                print(f"{name} refreshed", flush=True)
            continue
        again = " (ran with other settings: again)" if stored.get("finished") else ""
        print(f"{name} ...{again}", flush=True)

        def save(result: dict, store: Path = store) -> None:
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(store)
            write_markdown(args.md, sorted(SCALES))

        t0 = time.perf_counter()
        result = run_config(dataset, backdoor, mode, args, on_split=save)
        result["seconds"]["total"] = time.perf_counter() - t0
        save(result)
        print(json.dumps({k: v for k, v in result.items() if k != "train_history"}), flush=True)
    write_markdown(args.md, sorted(SCALES))
    print(f"tables in {args.md}")


if __name__ == "__main__":
    main()
