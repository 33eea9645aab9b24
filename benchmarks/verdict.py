"""The verdict benchmark: does `aabl split` call poisoned sets poisoned, with the right class, and clean sets clean?

    python benchmarks/verdict.py [--scale cpu|tiny] [--only GLOB,...] [--threads N] [--data ../shared/data]
        [--work scratch/verdict] [--results benchmarks/results/verdict] [--md benchmarks/VERDICT.md]
        [--table-only] [--list]

A matrix of seeded cases on CIFAR-10 and GTSRB (verdict_cases.py): clean subsets of several seeds; the
category A backdoors (BadNets, Trojan, IAB and a random-colour patch of this benchmark's own at two
places) at 1, 5 and 10 % poison; the category B ones (Blend, WaNet, SSBA) at 10 %; CIFAR-10 BadNets
at 20 % (the rate of the paper's Table 7). Every poisoned set is made twice, to the dataset's most
frequent class and to its rarest, both counted in the subset. Each case runs the real CLI, with the
scan settings of reproduce.py's scale of the same name:

    python benchmarks/subset.py TRAIN S --seed N ; aabl poison S --backdoor B --rate R --target T --out P
    aabl scan P --arch A --epochs E [--precision bf16] --seed N ; aabl split --link none

and stores the split's verdict, suspected class and bound, gamma and the ground truth's recall and
rho_vul in results/verdict/<scale>/<case>.json as soon as it finishes; a rerun skips finished cases,
so the benchmark runs piece by piece, across sessions. VERDICT.md (between its `tables` markers) is
rewritten from every result file: the matrix, and a summary that checks the goals (category A at 5
and 10 % called with the right class: all; at 1 %: at least 80 %; clean sets: no false alarm).

The random-colour patch (`randpatch-tl` top left, `randpatch-cr` centre right) is no `aabl poison`
choice: `poison_folder` writes it from a `Backdoor` of verdict_cases.py, with the same poison.csv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cli_runner import aabl, device_name
from reproduce import (
    ZIPS,
    flags,
    float32_note,
    machine_precision,
    pct,
    replace_tables,
    scan_options,
    stale,
    unzip_once,
)
from verdict_cases import (
    CASES,
    CATEGORY,
    DATASETS,
    PATCH_PLACES,
    SCALES,
    TABLE7_RATE,
    Case,
    cases_of,
    is_current,
    random_patch,
)

from aabl_cli.core.data import list_image_folder
from aabl_cli.core.workdir import Workdir
from aabl_cli.stages.poison import TRIGGER_FILE, poison_folder
from aabl_cli.stages.scan import scan, scan_settings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "verdict"
SUSPECTED = "backdoor suspected"

# Trained triggers are trained once and loaded back (--trigger) by the cases that share what they depend on:
# IAB's networks learn to flip images to the target, SSBA's encoder hides a fixed code whatever the target.
TRIGGER_PER_TARGET = {"iab": True, "ssba": False}
# Minutes of one scan, for the estimate of what is left before a dataset has results of its own: the
# cpu-scale scans of benchmarks/results/cpu (GTSRB 3.8-4.6 min; CIFAR-10 5.7 min with two threads).
SCAN_MINUTES = {"cpu": {"gtsrb": 4.0, "cifar10": 6.0}}


def dataset_dir(dataset: str, scale: dict, args: argparse.Namespace) -> Path:
    """The work folder of `dataset`'s subsets, triggers and cases: one per subset size, so that a scale which
    changes its size starts afresh."""
    size = scale["train_images"]
    return args.work / args.scale / dataset / (f"{size}-images" if size else "every-image")


def prepare_subset(dataset: str, seed: int, scale: dict, args: argparse.Namespace) -> Path:
    """The seeded, class-balanced training subset (subset.py), made once; every image where the scale takes
    all of them, which no seed changes."""
    zip_name, top = ZIPS[dataset]
    raw = args.work / "raw"
    unzip_once(args.data / zip_name, raw, top)
    size = scale["train_images"]
    folder = dataset_dir(dataset, scale, args) / (f"train-seed{seed}" if size else "train")
    if not folder.exists():
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, str(HERE / "subset.py"), raw / top / "train", tmp, "--size", str(size or 0),
                        "--seed", str(seed)], check=True, capture_output=True)
        tmp.rename(folder)
    return folder


def choose_targets(data: Path) -> dict[str, tuple[str, int]]:
    """(class, images) of the frequent and the rare target: the class with the most images (the first of
    equals) and the one with the fewest (the last of equals, so that a balanced set gives two classes)."""
    listing = list_image_folder(data)
    counts = np.bincount([label for _, label in listing.files], minlength=len(listing.classes))
    frequent = min(range(len(counts)), key=lambda i: (-counts[i], i))
    rare = min(range(len(counts)), key=lambda i: (counts[i], -i))
    return {"frequent": (listing.classes[frequent], int(counts[frequent])),
            "rare": (listing.classes[rare], int(counts[rare]))}


def poison(case: Case, train: Path, target: str, case_dir: Path, args: argparse.Namespace) -> Path:
    """The case's poisoned training folder (written once: poison writes it whole or not at all)."""
    out = case_dir / "poisoned"
    if out.exists():
        return out
    if case.backdoor in PATCH_PLACES:
        poison_folder(train, backdoor=random_patch(case.backdoor, seed=case.seed), out=out, rate=case.rate,
                      target=target, seed=case.seed, device=args.device, quiet=True)
        return out
    shared = None
    if case.backdoor in TRIGGER_PER_TARGET:
        key = f"{case.backdoor}-{target}" if TRIGGER_PER_TARGET[case.backdoor] else case.backdoor
        shared = case_dir.parent / "triggers" / f"{key}-seed{case.seed}" / TRIGGER_FILE
    trigger = ["--trigger", shared] if shared is not None and shared.exists() else []
    aabl("poison", train, "--backdoor", case.backdoor, "--rate", case.rate, "--target", target, "--seed", case.seed,
         "--out", out, *trigger, "--device", args.device, "--cache-dir", case_dir / "cache", "--quiet",
         threads=args.threads)
    if shared is not None and not trigger:
        shared.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / TRIGGER_FILE, shared.with_suffix(".tmp"))
        shared.with_suffix(".tmp").replace(shared)
    return out


def run_case(case: Case, args: argparse.Namespace) -> dict:
    """Poison, scan and split one case; its result (verdict, statistic, ground truth, settings, seconds)."""
    scale = machine_precision(SCALES[args.scale][case.dataset], args.device)
    train = prepare_subset(case.dataset, case.seed, scale, args)
    case_dir = dataset_dir(case.dataset, scale, args) / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    target, target_images = choose_targets(train)[case.target] if case.target else (None, None)
    data = train if case.backdoor == "none" else poison(case, train, target, case_dir, args)
    wd = Workdir(case_dir / "aabl-out")
    options = scan_options(scale, argparse.Namespace(seed=case.seed))
    if not wd.scan.json.exists():
        aabl("scan", data, *flags(options), "--resume", "--device", args.device, "--cache-dir", case_dir / "cache",
             "--quiet", "--workdir", wd.root, threads=args.threads)
    elif why := stale(wd.scan.json, data, scan, scan_settings, options):
        raise SystemExit(f"{wd.scan.path} ran with other settings than the {args.scale} scale's; remove {case_dir} "
                         f"(or pass another --work) to run {case.name} again ({why})")
    if args.resplit and wd.split.path.exists():
        shutil.rmtree(wd.split.path)  # the split alone again, from the scan it already has
    if not wd.split.json.exists():
        aabl("split", "--workdir", wd.root, "--link", "none", "--quiet", threads=args.threads)
    shutil.rmtree(case_dir / "cache", ignore_errors=True)  # decoded images no other case reads
    scanned, split = wd.read("scan"), wd.read("split")
    truth = split.get("ground_truth") or {}
    suspected = split["verdict"] == SUSPECTED
    poisoned = json.loads((data / "poison.json").read_text()) if case.backdoor != "none" else {}
    return {"case": case.name, "dataset": case.dataset, "backdoor": case.backdoor, "category": CATEGORY[case.backdoor],
            "rate": case.rate, "target": case.target, "target_class": target, "target_images": target_images,
            "seed": case.seed, "scale": args.scale, "train_images": scale["train_images"], "scan": options,
            "images": split["samples"],
            "naive_acc": scanned.get("acc"), "verdict": split["verdict"], "suspected_class": split["suspected_class"],
            "verdict_basis": split.get("verdict_basis"), "shared_patch": split.get("shared_patch"),
            "runner_up": split.get("runner_up"),
            "right_class": (suspected and split["suspected_class"] == target) if target else None,
            "false_alarm": suspected if case.backdoor == "none" else None,
            "concentration": split["concentration"], "concentration_low": split["concentration_low"],
            "core_size": split["core_size"], "cores": split.get("cores"), "kept_share": split["kept_share"],
            "recall": truth.get("recall"), "rho_vul": truth.get("rho_vul"),
            "isolated_precision": truth.get("precision"), "poisoned": truth.get("poisoned"),
            "warnings": split.get("warnings", []),
            "seconds": {"poison": poisoned.get("seconds", {}).get("total"), "scan": scanned["seconds"]["total"],
                        "split": split["seconds"]["total"]},
            "device": device_name(args.device), "threads": args.threads, "torch": torch.__version__,
            "aabl_version": split.get("aabl_version"), "date": datetime.date.today().isoformat()}


def load_results(results: Path, scale: str) -> dict[str, dict]:
    """Every stored result of `scale`, by case name."""
    return {r["case"]: r for r in (json.loads(p.read_text()) for p in sorted((results / scale).glob("*.json")))}




def _right(r: dict) -> str:
    """Whether a case was called right: a poisoned set suspected with its target, a clean set not suspected."""
    right = r["right_class"] if r["backdoor"] != "none" else not r["false_alarm"]
    return "yes" if right else "**no**"


def _verdict(r: dict) -> str:
    basis = r.get("verdict_basis")
    return f"{r['verdict']} (by {basis})" if basis else r["verdict"]


def _patch(r: dict) -> str:
    """The shared-patch test of each class tested: `class: ratio, flip` ("-" where not tested)."""
    if "shared_patch" not in r:
        return "not run"
    parts = []
    for t in (r["shared_patch"] or {}).get("tested", []):
        if t.get("ratio") is None:
            continue
        flip = "-" if t.get("flip") is None else f"{100 * t['flip']:.0f} %"
        parts.append(f"{t['class']}: {t['ratio']:.2f}, {flip}")
    return "; ".join(parts) or "-"


def _runner_up(r: dict) -> str:
    """The runner-up test of the suspected class: the commonest runner-up and its share, with the share
    above which the concentration is set aside ("-" where not tested; "not run" before the test existed)."""
    if "runner_up" not in r:
        return "not run"
    t = r["runner_up"] or {}
    if t.get("agreement") is None:
        return "-"
    aside = ", set aside" if t["refuted"] else ""
    return f"{t['runner_up']}: {100 * t['agreement']:.0f} % (> {100 * t['threshold']:.0f} %{aside})"


def _target(r: dict) -> str:
    return "-" if r["target"] is None else f"{r['target']}: {r['target_class']} ({r['target_images']})"


def _status(hits: int, done: int, total: int, need: int) -> str:
    """A goal of at least `need` hits among `total` cases, after `hits` of the `done` ones."""
    if hits >= need:
        return "met"
    return "NOT MET" if total - (done - hits) < need else "open"


def _goal(label: str, cases: list[Case], results: dict[str, dict], need: int, goal: str,
          right=lambda r: bool(r["right_class"])) -> list[str]:
    if not cases:
        return []
    done = [results[c.name] for c in cases if c.name in results]
    hits = sum(right(r) for r in done)
    share = f" ({hits / len(done):.0%})" if done else ""
    lines = [f"- {label}: {hits} of {len(done)} run{share}, {len(cases)} in the matrix; goal {goal}: "
             f"**{_status(hits, len(done), len(cases), need)}**."]
    missed = [r["case"] for r in done if not right(r)]
    return lines + ([f"  Missed: {', '.join(missed)}."] if missed else [])


def summary(scale: str, results: dict[str, dict]) -> list[str]:
    """The goals, each with how many of its cases ran and met it, and the cases that missed it by name."""
    cases = CASES[scale]
    a_high = [c for c in cases if CATEGORY[c.backdoor] == "A" and c.rate in (0.05, 0.10)]
    a_low = [c for c in cases if CATEGORY[c.backdoor] == "A" and c.rate == 0.01]
    clean = [c for c in cases if c.backdoor == "none"]
    lines = ["**Summary**", ""]
    lines += _goal("Category A at 5 % and 10 %, suspected with the right class", a_high, results, len(a_high), "all")
    lines += _goal("Category A at 1 %, suspected with the right class", a_low, results, math.ceil(0.8 * len(a_low)),
                   "at least 80 %")
    lines += _goal("Clean sets without a false alarm", clean, results, len(clean), "all (no false alarm)",
                   right=lambda r: not r["false_alarm"])
    alarms = [r for r in (results.get(c.name) for c in clean) if r]
    if alarms:
        lines.append(f"  False-alarm rate: {sum(r['false_alarm'] for r in alarms) / len(alarms):.0%} of "
                     f"{len(alarms)} clean sets ({', '.join(f'{d} {n}' for d, n in _per_dataset(alarms))}).")
    for c in (c for c in cases if c.rate == TABLE7_RATE):
        r = results.get(c.name)
        outcome = "not run" if r is None else (f"{r['verdict']} ({r['suspected_class']}, right class: "
                                               f"{_right(r)}), recall {pct(r['recall'])} %, rho_vul "
                                               f"{pct(r['rho_vul'], 2)} %")
        lines.append(f"- {c.name} (the rate of the paper's Table 7): {outcome}.")
    b_done = [r for r in (results.get(c.name) for c in cases if CATEGORY[c.backdoor] == "B") if r]
    if b_done:
        lines.append(f"- Category B (whole-image triggers, not expected to be named; no goal): "
                     f"{sum(r['verdict'] == SUSPECTED for r in b_done)} of {len(b_done)} suspected, "
                     f"{sum(bool(r['right_class']) for r in b_done)} with the target class.")
    unfit = [c.name for c in cases if results.get(c.name, {}).get("warnings")]
    if unfit:
        lines.append(f"- Split warned that the naive model did not fit its data (its verdict says little): "
                     f"{', '.join(unfit)}.")
    left = [c for c in cases if c.name not in results]
    lines.append(f"- Not yet run: {len(left)} of {len(cases)} cases{_estimate(scale, left, results)}; "
                 "`python benchmarks/verdict.py --list` names them.")
    return lines


def _per_dataset(rows: list[dict]) -> list[tuple[str, str]]:
    return [(d, f"{sum(r['false_alarm'] for r in rows if r['dataset'] == d)}/{sum(r['dataset'] == d for r in rows)}")
            for d in DATASETS if any(r["dataset"] == d for r in rows)]


def _estimate(scale: str, left: list[Case], results: dict[str, dict]) -> str:
    """About how long the cases `left` scan: each dataset's mean of its finished scans, else SCAN_MINUTES."""
    if not left or scale not in SCAN_MINUTES:
        return ""
    minutes = 0.0
    for dataset in DATASETS:
        done = [r["seconds"]["scan"] / 60 for r in results.values() if r["dataset"] == dataset]
        each = sum(done) / len(done) if done else SCAN_MINUTES[scale][dataset]
        minutes += each * sum(c.dataset == dataset for c in left)
    return f" (about {minutes / 60:.1f} h of scans, besides IAB's and SSBA's trigger training)"


def render(scale: str, results_dir: Path) -> str:
    """The Markdown of `scale`: the matrix of every finished case, in matrix order, and the summary."""
    results = load_results(results_dir, scale)
    order = {c.name: i for i, c in enumerate(CASES[scale])}
    rows = sorted(results.values(), key=lambda r: (order.get(r["case"], len(order)), r["case"]))
    lines = [f"### Scale `{scale}`: {sum(n in results for n in order)} of {len(order)} cases run", ""]
    lines += ["right? = a poisoned set suspected with its target class, a clean set not suspected; bound = the "
              "deciding core's lower 95 % confidence bound of the top class's concentration (`concentration_low`, "
              "suspected from 0.5), beside the point estimate and the core's size; runner-up = the commonest "
              "second choice of the scan's model among the suspected class's core images and its share (the "
              "concentration is set aside above the share given); shared patch = each core top "
              "class's spread ratio (a candidate at 0.1 or less) and the share of its robust images that leave it once "
              "that region is painted over (suspected from 50 %); recall = share of the poison "
              "isolated; rho_vul = poison left in the kept set; gamma = kept share.", "",
              "| case | data | backdoor | cat. | rate (%) | target (images) | seed | verdict | suspected | right? "
              "| bound (concentration, core) | runner-up | shared patch (ratio, flip) | recall | rho_vul | gamma "
              "| naive acc | scan (min) |",
              "| --- | --- | --- | --- | ---: | --- | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: "
              "| ---: | ---: |"
              ] if rows else ["No case has run yet."]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dataset']} | {r['backdoor']} | {r['category']} | {pct(r['rate'], 0)} | "
                     f"{_target(r)} | {r['seed']} | {_verdict(r)} | {r['suspected_class']} | {_right(r)} | "
                     f"{r['concentration_low']:.2f} ({r['concentration']:.2f}, {r['core_size']}) | {_runner_up(r)} | "
                     f"{_patch(r)} | "
                     f"{pct(r['recall'])} | {pct(r['rho_vul'], 2)} | {pct(r['kept_share'])} | "
                     f"{pct(r['naive_acc'])} | {r['seconds']['scan'] / 60:.1f} |")
    if rows:
        first = rows[0]
        lines += ["", f"Scans: `{first['scan']['arch']}`, naive epochs: {first['scan']['epochs']}"
                  f"{', ' + first['scan']['precision'] if 'precision' in first['scan'] else ''}; "
                  f"device {first['device']}, torch {first['torch']}, aabl {first['aabl_version']}."]
    in_fp32 = [r["case"] for r in rows if r["scan"].get("precision") == "fp32"
               and SCALES[scale][r["dataset"]].get("precision") == "bf16"]
    if in_fp32:
        lines += float32_note("Scanned", "every case above" if len(in_fp32) == len(rows) else ", ".join(in_fp32))
    outdated = [r["case"] for r in rows if r["case"] in order and not is_current(r, scale)]
    if outdated:
        lines += ["", f"Scanned with settings this scale no longer gives (a rerun scans them again): "
                  f"{', '.join(outdated)}."]
    return "\n".join(lines + [""] + summary(scale, results)) + "\n"


def write_markdown(path: Path, results_dir: Path, scale: str) -> None:
    """Rewrite the tables of `path` between its markers: `scale`'s and those of every other scale with results."""
    scales = [s for s in SCALES if s == scale or any((results_dir / s).glob("*.json"))]
    tables = "\n".join(render(s, results_dir) for s in scales)
    replace_tables(path, tables, "The verdict benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: reproduce.py's cpu scan settings; tiny: one epoch, for the test")
    parser.add_argument("--only", default="", help="comma-separated globs on the case name, e.g. 'gtsrb-*-10pct-*'")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data",
                        help=f"folder of {' and '.join(z for z, _ in ZIPS.values())}")
    parser.add_argument("--work", type=Path, default=HERE.parent / "scratch" / "verdict",
                        help="work folder: extracted data, subsets, poisoned sets, scans")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files, one per scale")
    parser.add_argument("--md", type=Path, default=HERE / "VERDICT.md", help="Markdown file whose tables are rewritten")
    parser.add_argument("--device", default="auto", help="for every command: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per command (default: all)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the tables from the results")
    parser.add_argument("--list", action="store_true", help="print the cases (after --only) and which are done")
    parser.add_argument("--resplit", action="store_true",
                        help="split finished cases again from their scans (after a change to the split or the "
                             "verdict); cases without a scan in --work are run in full")
    args = parser.parse_args()
    args.work = args.work.resolve()
    cases = cases_of(args.scale, args.only)
    out_dir = args.results / args.scale
    if args.list:
        done = load_results(args.results, args.scale)
        for case in cases:
            print(f"{case.name:<36} {'done' if case.name in done else 'not run'}")
        print(f"{sum(c.name in done for c in cases)} of {len(cases)} cases done (scale {args.scale})")
        return
    todo = [] if args.table_only else cases
    missing = {ZIPS[c.dataset][0] for c in todo if not (args.work / "raw" / ZIPS[c.dataset][1]).exists()
               and not (args.data / ZIPS[c.dataset][0]).is_file()}
    if missing:
        parser.error(f"{', '.join(sorted(missing))} not in {args.data}; pass --data DIR, the folder holding them")
    if args.threads:
        torch.set_num_threads(args.threads)  # the random patch is poisoned in this process
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
    for case in todo:
        store = out_dir / f"{case.name}.json"
        earlier = json.loads(store.read_text()) if store.exists() else None
        if earlier and is_current(earlier, args.scale) and not args.resplit:
            print(f"{case.name}: finished earlier", flush=True)
            continue
        print(f"{case.name} ...", flush=True)
        t0 = time.perf_counter()
        result = run_case(case, args)
        result["seconds"]["total"] = time.perf_counter() - t0
        if args.resplit and earlier and earlier["seconds"].get("scan") == result["seconds"]["scan"]:
            result["seconds"] = {**earlier["seconds"], "split": result["seconds"]["split"]}  # the run's own cost
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(store)
        write_markdown(args.md, args.results, args.scale)
        recall = "" if result["recall"] is None else f", recall {pct(result['recall'])} %"
        print(f"{case.name}: {result['verdict']} ({result['suspected_class']}, bound "
              f"{result['concentration_low']:.2f}){recall}, {result['seconds']['total']:.0f}s", flush=True)
    write_markdown(args.md, args.results, args.scale)
    print(f"tables in {args.md}")


if __name__ == "__main__":
    main()
