"""aabl's split beside published poison detectors, on the same poisoned sets and the same naive model.

    python benchmarks/peers.py WORKDIR [WORKDIR ...] [--name NAME ...]
    python benchmarks/peers.py --scale cpu [--only cifar10/badnets,...] [--work scratch/reproduce]
    options: [--cleanlab-folds 5] [--device auto] [--threads N] [--cache-dir DIR]
             [--results benchmarks/results/peers] [--md benchmarks/PEERS.md] [--table-only]

The input is a finished aabl work directory (scan/ and split/ done) whose scan.json names a poisoned training
folder holding the `poison.csv` ground truth that `aabl poison` writes. Either WORKDIRs, named by `--name` (one
per WORKDIR, in order; default the folder's name), or those benchmarks/reproduce.py left at
WORK/<scale>/<dataset>/<backdoor>/aabl (seed 0) for `--scale` and `--only` (default: DEFAULT_ONLY), named
<scale>/<dataset>/<backdoor>. reproduce.py writes scan/ and split/ before it trains, so a configuration can
be compared as soon as its split is done.

On each, beside the split (peer_defences.py says how each is fed): ART's ActivationDefence with its default
clustering and both cluster analyses its documentation names, and its SpectralSignatureDefense with the true
poison rate and its default 0.33, on the scan model's penultimate features; cleanlab's find_label_issues on
out-of-sample probabilities from k-fold training with the scan's recipe (`--cleanlab-folds 0` skips it, the
costly one: it trains k naive models). Each is measured against poison.csv: recall, precision, rho_vul (the
poison's share of what the defence keeps), gamma (the share kept) and its seconds. Decoding (cached) and the
scan's naive training, on which every defence but cleanlab stands, are in no defence's seconds; the latter
is recorded beside them (`naive.train_seconds`).

Results go to RESULTS/<name, / as ->.json after each defence; a rerun skips every defence stored with the
same settings for the same scan model (its checkpoint's sha256). MD, between its `tables` markers, is
rewritten from every result file; `--table-only` does only that. ART and cleanlab are the `bench` extra
(`pip install -e ".[bench]"`), never aabl's own dependencies.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from cli_runner import device_name
from peer_defences import PACKAGES, PEERS, Case, versions
from reproduce import MARK_BEGIN, MARK_END, pct, replace_tables  # noqa: F401  (the markers: its pages, for its callers)

from aabl_cli.core.device import resolve_device
from aabl_cli.core.errors import AablError
from aabl_cli.core.workdir import Workdir

HERE = Path(__file__).resolve().parent
DEFAULT_ONLY = "cifar10/badnets,cifar10/blend,cifar10/wanet,cifar10/clb,gtsrb/badnets"  # the set
EXTRA = 'pip install -e ".[bench]"'
SAME = 1e-9  # numbers closer than this count as equal when a peer is set against the split


def run_peer(peer_id: str, case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """One defence on `case`: its row of the result file."""
    peer = PEERS[peer_id]
    return {"method": peer.method, "settings": settings, **peer.run(case, settings), "versions": versions(peer.needs),
            "device": device_name(str(case.device)), "date": datetime.date.today().isoformat()}


def result_path(results: Path, name: str) -> Path:
    """The result file of configuration `name`: its slashes become dashes."""
    return results / (name.replace("/", "-") + ".json")


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Every defence on `case` that its result file lacks (or holds with other settings); the file is written
    after each one."""
    path = result_path(args.results, case.name)
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored and stored.get("source") != case.source():
        print(f"{case.name}: the scan changed since the stored rows: every defence again", flush=True)
        stored = {}
    poison_json = case.data / "poison.json"
    poison = json.loads(poison_json.read_text()) if poison_json.is_file() else {}
    result = {"name": case.name, "workdir": str(case.wd.root), "source": case.source(),
              "samples": case.split["samples"], "poisoned": case.split["ground_truth"]["poisoned"], "rho": case.rho,
              "backdoor": poison.get("backdoor"), "target": poison.get("target_name"),
              "naive": {"arch": case.scan["settings"]["arch"], "epochs": case.scan["settings"]["epochs"],
                        "acc": case.scan.get("acc"), "train_seconds": case.scan["seconds"]["train"]},
              "peers": stored.get("peers", {})}
    for peer_id, peer in PEERS.items():
        settings = peer.settings(case, args)
        if settings is None:
            continue
        settings = json.loads(json.dumps(settings))  # as the file stores it
        if result["peers"].get(peer_id, {}).get("settings") == settings:
            print(f"{case.name} {peer_id}: done earlier", flush=True)
            continue
        print(f"{case.name} {peer_id} ...", flush=True)
        result["peers"][peer_id] = run_peer(peer_id, case, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
        row = result["peers"][peer_id]
        print(f"{case.name} {peer_id}: recall {row['recall']}, rho_vul {row['rho_vul']:.4f}, gamma "
              f"{row['gamma']:.4f}, {row['seconds']:.1f} s", flush=True)
        write_markdown(args.md, args.results)
    return result


# ---------------------------------------------------------------- the tables




def against(row: dict[str, Any], split: dict[str, Any]) -> str:
    """A peer set against the split: it beats the split when it leaves no more poison in what it keeps
    (rho_vul) while keeping no less data (gamma), better in one of them."""
    less_poison = split["rho_vul"] - row["rho_vul"]
    more_data = row["gamma"] - split["gamma"]
    if abs(less_poison) <= SAME and abs(more_data) <= SAME:
        return "same as the split"
    if less_poison >= -SAME and more_data >= -SAME:
        return "**beats the split**"
    if less_poison <= SAME and more_data <= SAME:
        return "worse than the split"
    return "less poison left, less data kept" if less_poison > 0 else "more poison left, more data kept"


def render(results: list[dict[str, Any]]) -> str:
    """The Markdown of every result: a summary of where a peer beats the split, then one table a configuration."""
    if not results:
        return "No configuration run yet.\n"
    beaten = {r["name"]: [PEERS[p].method if p in PEERS else p for p, row in r["peers"].items()
                          if p != "aabl-split" and "aabl-split" in r["peers"]
                          and against(row, r["peers"]["aabl-split"]) == "**beats the split**"] for r in results}
    lines = ["**Where a peer beats the split** (less or as much poison left, as much data kept or more):", ""]
    lines += [f"- {name}: {', '.join(peers) if peers else 'none'}" for name, peers in beaten.items()]
    for r in results:
        naive = r["naive"]
        what = f"{r['backdoor']}, target {r['target']}" if r.get("backdoor") else "poisoned"
        lines += ["", f"### {r['name']}", "",
                  f"{r['samples']:,} images, {r['poisoned']:,} of them poison ({pct(r['rho'], 2)} %; {what}); "
                  f"naive model `{naive['arch']}`, {naive['epochs']} epochs, ACC on its training images "
                  f"{pct(naive.get('acc'))} %, trained in {naive['train_seconds']:.0f} s (in no row's seconds).", "",
                  "| defence | flagged | recall | precision | rho_vul | gamma | seconds | against the split |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        split = r["peers"].get("aabl-split")
        for peer_id, row in r["peers"].items():
            versus = "-" if split is None or peer_id == "aabl-split" else against(row, split)
            lines.append(f"| {row['method']} | {row['flagged']:,} | {pct(row['recall'])} | {pct(row['precision'])} "
                         f"| {pct(row['rho_vul'], 2)} | {pct(row['gamma'])} | {row['seconds']:.1f} | {versus} |")
        settings = [f"`{p}` {json.dumps(row['settings'], sort_keys=True)}" for p, row in r["peers"].items()
                    if p != "aabl-split"]
        devices = sorted({row["device"] for row in r["peers"].values()})
        used = {k: v for row in r["peers"].values() for k, v in row["versions"].items()}
        lines += ["", f"Device {', '.join(devices)}; " + ", ".join(f"{k} {v}" for k, v in sorted(used.items()))
                  + ". Settings: " + "; ".join(settings) + "."]
    done = {r["name"] for r in results}
    missing = [f"cpu/{c}" for c in DEFAULT_ONLY.split(",") if f"cpu/{c}" not in done]
    if missing and any(name.startswith("cpu/") for name in done):
        lines += ["", f"Not yet run at the cpu scale: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_markdown(md: Path, results: Path) -> None:
    """Rewrite the tables between MD's markers from every result file under `results`."""
    stored = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    replace_tables(md, render(stored), "aabl's split beside its peers")


# ---------------------------------------------------------------- the command


def missing_extra(needs: set[str]) -> str | None:
    """The message naming the bench extra when a module of `needs` cannot be imported, else None."""
    absent = [PACKAGES[module] for module in sorted(needs) if importlib.util.find_spec(module) is None]
    if not absent:
        return None
    skip = " (or pass --cleanlab-folds 0 to leave cleanlab out)" if PACKAGES["cleanlab"] in absent else ""
    return f"peers.py needs {' and '.join(absent)}, the benchmark's `bench` extra: {EXTRA}{skip}"


def cases_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[str, Path]]:
    """(name, work directory) of every configuration asked for."""
    if args.workdirs:
        names = args.name or [Path(wd).resolve().name for wd in args.workdirs]
        if len(names) != len(args.workdirs):
            parser.error(f"--name is given {len(names)} times for {len(args.workdirs)} WORKDIRs; give one per WORKDIR")
        return list(zip(names, args.workdirs))
    found = []
    for item in args.only.split(","):
        dataset, _, backdoor = item.strip().partition("/")
        workdir = args.work / args.scale / dataset / backdoor / "aabl"
        if not (Workdir(workdir).split.json.exists() and Workdir(workdir).scan.model.exists()):
            print(f"{args.scale}/{item}: no finished split in {workdir} (python benchmarks/reproduce.py --scale "
                  f"{args.scale} --only {item} writes it): skipped", flush=True)
            continue
        found.append((f"{args.scale}/{dataset}/{backdoor}", workdir))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="*", type=Path, metavar="WORKDIR", help="finished aabl work directories")
    parser.add_argument("--name", action="append", help="a WORKDIR's name in the tables, once per WORKDIR "
                        "(default: its folder's name)")
    parser.add_argument("--scale", help="instead of WORKDIRs: reproduce.py's configurations at this scale")
    parser.add_argument("--only", default=DEFAULT_ONLY,
                        help="with --scale: DATASET/BACKDOOR,... (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=HERE.parent / "scratch" / "reproduce",
                        help="with --scale: reproduce.py's --work (default: %(default)s)")
    parser.add_argument("--cleanlab-folds", type=int, default=5, metavar="K",
                        help="k of cleanlab's k-fold training, k naive models; 0 skips it (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="features and cleanlab's training: auto, cpu, cuda, cuda:N, mps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="aabl's decode cache (default: aabl's own; with --scale: WORK/cache, reproduce.py's)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "peers",
                        help="folder of the result files (default: %(default)s)")
    parser.add_argument("--md", type=Path, default=HERE / "PEERS.md",
                        help="Markdown file whose tables are rewritten (default: %(default)s)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the tables from the results")
    args = parser.parse_args()
    if args.table_only:
        write_markdown(args.md, args.results)
        print(f"tables in {args.md}")
        return
    if bool(args.workdirs) == bool(args.scale):
        parser.error("give WORKDIRs or --scale (reproduce.py's configurations), not both nor neither")
    if args.cleanlab_folds < 0 or args.cleanlab_folds == 1:
        parser.error(f"--cleanlab-folds {args.cleanlab_folds}: give 2 or more folds, or 0 to skip cleanlab")
    if any(not re.fullmatch(r"[\w.\-/]+", name) for name in args.name or []):
        parser.error("--name takes letters, digits and - _ . / only")
    if args.scale and not all(re.fullmatch(r"\w+/\w+", item.strip()) for item in args.only.split(",")):
        parser.error(f"--only takes DATASET/BACKDOOR items separated by commas, e.g. {DEFAULT_ONLY}")
    needs = {m for peer_id, peer in PEERS.items() for m in peer.needs if peer_id != "cleanlab" or args.cleanlab_folds}
    message = missing_extra(needs)
    if message:
        print(message, file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or (args.work / "cache" if args.scale else None)
    try:
        device = resolve_device(args.device)
    except AablError as err:
        parser.error(str(err))
    for name, workdir in cases_of(args, parser):
        run_case(Case(name, workdir, device=device, cache_dir=cache_dir), args)
    write_markdown(args.md, args.results)
    print(f"tables in {args.md}")


if __name__ == "__main__":
    main()
