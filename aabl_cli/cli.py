"""The `aabl` command line: parses options and calls the stage functions, nothing more."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click

from aabl_cli import __version__
from aabl_cli.core.errors import GateFailed
from aabl_cli.core.text import json_text, printable
from aabl_cli.options import (
    ARCH_CHOICES,
    ATTACK_CHOICES,
    ATTACK_HELP,
    ATTACK_STEPS,
    BACKDOOR_CHOICES,
    BACKDOOR_HELP,
    BUDGET,
    SHARE,
    AablGroup,
    FiniteFloat,
    check_attack_options,
    check_run_options,
    common_options,
    data_memory_option,
    emit,
    one_backdoor,
    parse_milestones,
    precision_option,
    recipe_options,
    run_stage_flags,
    run_stage_options,
    scaled_lr,
    show_warning,
    training_options,
)


@click.group(cls=AablGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="aabl")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Clean a poisoned image-classification training set and train a robust model on it.

    A-ABL (Zhao & Wressnegger, AISec 2024) in three stages that share one work directory:

    \b
      aabl scan ./data              naive model + iFGSM robustness score per image
      aabl split                    Otsu cut: robust (suspicious) images isolated
      aabl train --eps 8/255        PGD adversarial training on the kept images
      aabl report aabl-out          one HTML page: what was removed and why

    Data is an image folder: ROOT/<class>/<image>. Budgets are in [0, 1] pixel units and
    accept fractions (8/255). Exit codes: 0 ok, 1 runtime failure, 2 bad input, 3 a
    `split` CI gate tripped.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    warnings.showwarning = show_warning



@cli.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@training_options("resnet18")
@click.option("--epochs", type=click.IntRange(0), default=20, show_default=True,
              help="Naive training epochs (Adam, no weight decay, crop+flip).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate.")
@click.option("--eps", type=BUDGET, default="2/255", show_default=True,
              help="iFGSM scoring budget in [0, 1] pixel units. The paper uses 2/255 for 32-px CIFAR-10 and "
                   "GTSRB and 1/255 for 64-px Tiny-ImageNet.")
@click.option("--step-size", type=BUDGET, default="2/255", show_default=True, help="iFGSM step size.")
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True, help="iFGSM steps.")
@click.option("--alpha", type=FiniteFloat(min=0), default=0.1, show_default=True,
              help="SCE weight of cross-entropy.")
@click.option("--beta", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="SCE weight of reverse cross-entropy.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Score with this checkpoint (model.safetensors) instead of training a naive model.")
@common_options
def scan(data: Path, model_path: Path | None, as_json: bool, **options: Any) -> None:
    """Train a naive model on DATA and score every image by its robustness to iFGSM.

    Writes WORKDIR/scan/: scores.csv (one row per image, in dataset order; lower score =
    more robust = more suspicious), model.safetensors, scan.json and scores.png.
    """
    from aabl_cli.core.distributed import launched_as_main
    from aabl_cli.core.workdir import Workdir
    from aabl_cli.stages.scan import scan as run_scan

    summary = run_scan(data, model=model_path, **options)
    if not launched_as_main():  # under torchrun rank 0 alone reports
        return
    text = (f"scanned {summary['samples']} images in {summary['seconds']['total']:.0f} s: clean accuracy "
            f"{summary['acc']:.1%}, under iFGSM {summary['ra']:.1%}\n"
            f"wrote {Workdir(options['workdir']).scan.path}/ (scores.csv, model.safetensors, scan.json, scores.png)")
    emit(summary, as_json, text)


@cli.command()
@click.argument("scores", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("aabl-out"),
              show_default=True, help="Work directory; SCORES defaults to WORKDIR/scan/scores.csv.")
@click.option("--method", type=click.Choice(["otsu", "quantile", "fixed"]), default="otsu", show_default=True,
              help="otsu: Otsu's threshold; quantile: isolate the --fraction lowest scores; "
                   "fixed: isolate scores below --threshold.")
@click.option("--fraction", type=SHARE, default=None, help="With --method quantile: the share to isolate.")
@click.option("--threshold", type=FiniteFloat(), default=None, help="With --method fixed: isolate scores below this.")
@click.option("--min-isolated", type=SHARE, default="0.10", show_default=True,
              help="Otsu only: isolate at least this share (the paper's Table 1 implies 10 %; 0 = pure Otsu).")
@click.option("--isolate-misfit", is_flag=True,
              help="Also isolate every image the naive model puts in another class than its own: poisons it "
                   "did not learn look like that. Not the paper's; on GTSRB BadNets 10 % it halved the poison "
                   "left in the kept set (2.1 -> 1.0 %) for 7 points of the kept share (2 on the clean set).")
@click.option("--link", type=click.Choice(["copy", "hardlink", "symlink", "none"]), default="copy",
              show_default=True, help="How kept/ and isolated/ get their files; a hardlink shares the source's "
                                      "bytes, so editing kept/ would edit the source; none writes only split.csv.")
@click.option("--fail-over", type=SHARE, default=None,
              help="CI gate: exit 3 (after writing everything) when more than this share is isolated. Off by "
                   "default: clean sets lose 25-50 % too, so set it as a budget above what a clean version of "
                   "your data isolates.")
@click.option("--fail-on-suspect", is_flag=True,
              help="CI gate: exit 3 (after writing everything) when the verdict is 'backdoor suspected'.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Print nothing but --json output and errors.")
def split(as_json: bool, quiet: bool, **options: Any) -> None:
    """Split the scanned images into kept/ and isolated/ (suspected poison).

    Reads SCORES (scores.csv with its scan.json) and the dataset folder it names; writes
    WORKDIR/split/: kept/ and isolated/ image folders, split.csv and split.json.
    """
    from aabl_cli.core.workdir import Workdir
    from aabl_cli.stages.split import describe
    from aabl_cli.stages.split import split as run_split

    summary = run_split(**options)
    if not quiet or as_json:
        emit(summary, as_json, describe(summary) + f"\nwrote {Workdir(options['workdir']).split.path}/")
    if summary["gates"]:
        raise GateFailed("; ".join(summary["gates"]))


@cli.command()
@click.argument("data", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@training_options("resnet18")
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True, help="Training epochs.")
@click.option("--eps", type=BUDGET, default="8/255", show_default=True,
              help="PGD training budget in [0, 1] pixel units; 0 trains plainly (no attack).")
@click.option("--step-size", type=BUDGET, default="2/255", show_default=True, help="PGD step size.")
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True, help="PGD steps per batch.")
@click.option("--adv-method", type=click.Choice(["pgd", "fgsm-rs"]), default="pgd", show_default=True,
              help="pgd: the paper's PGD training. fgsm-rs: one FGSM step of 1.25 x eps from a random start "
                   "(Wong et al. 2020), about 5x cheaper per batch than PGD-10; ignores --steps and --step-size.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=0.1, show_default=True,
              help="SGD learning rate. Left at its default it scales with the batch size (0.1 x "
                   "batch / 128, the linear scaling rule); given explicitly it is used as is.")
@click.option("--momentum", type=FiniteFloat(0, 1), default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=5e-4, show_default=True,
              help="SGD weight decay.")
@click.option("--milestones", default=None,
              help="Epochs at which the learning rate drops x0.1, comma-separated.  [default: 50 %, 75 % and "
                   "90 % of --epochs]")
@recipe_options("")
@click.option("--val", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Image folder evaluated after each epoch (clean and PGD accuracy on a seeded, class-balanced "
                   "subset of up to 1,000 images).")
@common_options
def train(data: Path | None, milestones: str | None, as_json: bool, **options: Any) -> None:
    """PGD adversarial training from scratch on DATA (default: WORKDIR/split/kept).

    Writes WORKDIR/train/: model.safetensors, train.json and history.csv.
    """
    from aabl_cli.core.distributed import launched_as_main
    from aabl_cli.core.workdir import Workdir
    from aabl_cli.stages.train import train as run_train

    options["lr"] = scaled_lr(options, "lr")
    summary = run_train(data, milestones=parse_milestones(milestones, options["epochs"], options["schedule"]),
                        **options)
    if not launched_as_main():
        return
    final, epochs = summary["final"], summary["settings"]["epochs"]
    extra = "".join(f", {k} {final[k]:.1%}" for k in ("val_acc", "val_ra") if k in final)
    if summary["collapse_epoch"] is not None:
        extra += f"\nval_ra collapsed at epoch {summary['collapse_epoch']} (catastrophic overfitting)"
    if summary["kept_epoch"] != epochs:
        extra += f"\nsaved epoch {summary['kept_epoch']}, the best val_ra ({summary['best_val_ra']:.1%})"
    text = (f"trained {epochs} epochs on {summary['samples']} images in "
            f"{summary['seconds']['total']:.0f} s: train accuracy {final.get('train_acc', float('nan')):.1%}{extra}\n"
            f"wrote {Workdir(options['workdir']).train.path}/ (model.safetensors, train.json, history.csv)")
    emit(summary, as_json, text)


@cli.command(epilog=BACKDOOR_HELP)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backdoor", type=click.Choice(BACKDOOR_CHOICES), default=None,
              help="The backdoor to plant (see below).  [required]")
@click.option("--attack", "old_backdoor", type=click.Choice(BACKDOOR_CHOICES), default=None, hidden=True,
              help="The earlier name of --backdoor, still accepted.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the poisoned copy to (replaced whole; DATA is never modified).")
@click.option("--rate", type=SHARE, default=None,
              help="Share poisoned: of the whole set, drawn from the non-target classes; for clb, of the target "
                   "class.  [default: 0.1; 0.5 for clb]")
@click.option("--target", default="0", show_default=True, help="Target class: an index into the sorted class "
                                                                  "names, or a class name.")
@click.option("--test", is_flag=True, help="Write the ASR set instead: every non-target image triggered and "
                                           "relabelled to the target (no wanet noise images).")
@click.option("--pattern", default="image", show_default=True,
              help="Blend pattern: image (a smooth photo bundled with scikit-image), noise (seeded uniform "
                   "noise) or a path to an image file.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Training epochs of the network the backdoor trains on DATA: iab's mask, then its generator "
                   "with a classifier; ssba's encoder and decoder; clb's victim model.  [default: iab 10, ssba 10, "
                   "clb 5]")
@click.option("--arch", type=click.Choice(ARCH_CHOICES), default="cnn", show_default=True,
              help="The classifier iab trains with its generator, and clb's victim model.")
@click.option("--trigger", type=click.Path(exists=True, path_type=Path), default=None,
              help="iab / ssba: load the trigger networks from this trigger.safetensors (or the folder holding it) "
                   "instead of training them; required with --test.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG of clean against triggered examples, with their difference amplified.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds which images are poisoned, wanet's noise and the networks' training.")
@click.option("--device", default="auto", show_default=True, help="Where networks train: auto, cpu, cuda, cuda:N "
                                                                   "or mps.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where DATA is cached decoded for training.  [default: $XDG_CACHE_HOME/aabl]")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def poison(data: Path, backdoor: str | None, old_backdoor: str | None, as_json: bool, **options: Any) -> None:
    """Write a poisoned copy of the image folder DATA, with its ground truth, for evaluation.

    OUT gets the images (untouched ones copied byte for byte, triggered ones as PNG named
    after their origin class: poisons in the target class, wanet's noise images in their
    own), poison.csv (path, poisoned, kind, original_label, label, backdoor, target) and
    poison.json (the settings, the training report and the seconds taken).
    """
    from aabl_cli.stages.poison import poison_folder

    backdoor = one_backdoor(backdoor, old_backdoor)
    summary = poison_folder(data, backdoor=backdoor, **options)
    counts = summary["counts"]
    noise = f" (+{counts['noise']} noise images that keep their label)" if counts["noise"] else ""
    text = (f"wrote {options['out']}/: {counts['poisoned']} of {counts['written']} images poisoned with "
            f"{backdoor} -> class {summary['target']} ({printable(summary['target_name'])}){noise}")
    emit(summary, as_json, text)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("test", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--poisoned", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Triggered test folder (aabl poison --test) for the attack success rate.")
@click.option("--attack", type=click.Choice(ATTACK_CHOICES), default="pgd", show_default=True, help=ATTACK_HELP)
@click.option("--eps", type=BUDGET, default="8/255", show_default=True,
              help="L-inf budget of the attack for the robust accuracy, in [0, 1] pixel units; 0 skips RA.")
@click.option("--step-size", type=BUDGET, default="2/255", show_default=True,
              help="PGD's step size (pgd only: APGD sets its own steps).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Iterations: PGD's steps; APGD's iterations per run (each APGD-T target gets as many). Each is "
                   "one forward-backward pass per image.  [default: 10 for pgd, 100 for apgd and autoattack]")
@click.option("--restarts", type=click.IntRange(1), default=1, show_default=True,
              help="Runs from independent random starts (autoattack: of APGD-CE, and of APGD-T per target); each "
                   "later run attacks only the images no earlier one fooled, and an image counts as robust only if "
                   "it survives all.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Images per batch.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON result to this file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the attacks' random starts.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where decoded datasets are cached.  [default: $XDG_CACHE_HOME/aabl]")
@precision_option()
@data_memory_option()
@click.option("--quiet", is_flag=True, help="No progress bars and no line in words on stderr (the JSON, warnings "
                                            "and errors still print).")
def evaluate(model: Path, test: Path, attack: str, eps: float, step_size: float, steps: int | None, restarts: int,
             out: Path | None, **options: Any) -> None:
    """Measure MODEL on TEST: ACC (clean accuracy), RA (accuracy under --attack) and, with
    --poisoned, ASR (share of triggered images classified as the target).

    Prints the result as JSON on stdout (its "attack" names RA's attack and settings) and,
    unless --quiet, one line in words on stderr.
    """
    from aabl_cli.core.attacks import Threat
    from aabl_cli.core.distributed import launched_as_main
    from aabl_cli.core.fsutil import Place, refuse_overlap, write_json
    from aabl_cli.stages.evaluate import describe
    from aabl_cli.stages.evaluate import evaluate as run_evaluate

    check_attack_options(attack)
    if out is not None:
        poisoned = options["poisoned"]
        refuse_overlap([Place(model, "MODEL"), Place(test, "the input folder"),
                        None if poisoned is None else Place(poisoned, "the input folder")],
                       replaces=[Place(out, "--out")], fix="choose an --out outside the inputs")
    steps = steps if steps is not None else ATTACK_STEPS[attack]
    result = run_evaluate(model, test, threat=Threat(eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                                                     attack=attack), **options)
    if not launched_as_main():  # under torchrun rank 0 alone reports
        return
    if out is not None:
        write_json(out, result)
    click.echo(json_text(result, indent=2))
    if not options["quiet"]:
        click.echo(printable(describe(result)), err=True)
    for warning in result["warnings"]:
        click.echo(printable(f"warning: {warning}"), err=True)


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page.  [default: WORKDIR/report.html]")
@click.option("--per-class", type=click.IntRange(1), default=8, show_default=True,
              help="Gallery: the most suspicious isolated images shown per class (256 in all at most).")
@click.option("--device", default="auto", show_default=True, help="Where the saliency maps are computed: auto, "
                                                                   "cpu, cuda, cuda:N or mps.")
@click.option("--quiet", is_flag=True, help="Print nothing but --json output and errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def report(workdir: Path, as_json: bool, **options: Any) -> None:
    """Write one self-contained HTML page about WORKDIR's scan and split (and training).

    It shows the summary and verdict, the score histogram, each class's isolated share, the
    training curves, every stage's settings, the split against the ground truth where there
    is one, and the most suspicious isolated images with gradient saliency maps that show
    where the trigger sits. Everything is inlined; nothing else in WORKDIR or the dataset changes.
    """
    from aabl_cli.stages.report import report as write_report

    summary = write_report(workdir, **options)
    if not options["quiet"] or as_json:
        emit(summary, as_json, f"wrote {summary['report']} ({summary['bytes'] / 1e6:.1f} MB): "
                               f"{summary['gallery']['images']} isolated images in the gallery, verdict: "
                               f"{summary['verdict']}")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("aabl-demo"),
              show_default=True, help="Where the demo's data and outputs go (left for you to look at).")
@click.option("--quick", is_flag=True, help="A smaller run (under a minute) that checks the plumbing, not the "
                                            "method: its numbers are not meaningful.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data, the poison and training.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def demo(as_json: bool, **options: Any) -> None:
    """Run A-ABL end to end on generated data: no download, a few minutes on a laptop CPU.

    Generates 10 classes of shapes and plants two backdoors on disjoint images: BadNets
    (corner patch, category A) to class 0 on 10 % and WaNet (whole-image warp, category B)
    to class 1 on 10 %. Then runs scan, split and PGD adversarial training with the small
    CNN, and prints ACC, RA and each backdoor's ASR for the naive model against the A-ABL
    model, how much of each backdoor's poison the split isolated, gamma, rho_vul and the
    verdict: the split removes the patch, adversarial training suppresses the warp.
    """
    from aabl_cli.stages.demo import describe, run_demo

    result = run_demo(**options)
    emit(result, as_json, describe(result))


@cli.command("run")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@run_stage_flags
@click.option("--dry-run", is_flag=True,
              help="Print the plan (which stages run, which are already done) and an estimated time for this "
                   "machine, measured on a few training steps; run nothing.")
@common_options
def run(data: Path, as_json: bool, dry_run: bool, **o: Any) -> None:
    """Scan, split and train DATA in one work directory: the whole method in one command.

    A stage whose JSON already records the same settings and data is not redone, so the
    same command continues a run that stopped; an interrupted stage resumes from its last
    finished epoch. Options of one stage carry its name (--scan-epochs, --train-eps, ...).
    """
    from aabl_cli.core.distributed import launched_as_main
    from aabl_cli.stages.run import run_pipeline

    o["train_lr"] = scaled_lr(o, "train_lr")
    check_run_options(o)
    common, scan_opts, split_opts, train_opts = run_stage_options(o)
    summary = run_pipeline(data, workdir=o["workdir"], scan_opts=scan_opts, split_opts=split_opts,
                           train_opts=train_opts, common=common, dry_run=dry_run, quiet=o["quiet"])
    if not launched_as_main():
        return
    if dry_run:
        emit(summary, as_json, "\n".join(summary["lines"]))
        return
    gates = summary["split"].get("gates", [])
    if gates:
        emit(summary, as_json, "training skipped: a split gate tripped")
        raise GateFailed("; ".join(gates))
    accuracy = summary["train"].get("final", {}).get("train_acc", float("nan"))
    split_summary = summary["split"]
    text = (f"kept {split_summary['kept']} of {split_summary['samples']} images (isolated "
            f"{split_summary['isolated_share']:.1%}, verdict: {split_summary['verdict']}); trained "
            f"{summary['train']['settings']['epochs']} epochs: train accuracy {accuracy:.1%}\n"
            f"wrote {o['workdir']}/ (scan/, split/, train/)")
    emit(summary, as_json, text)


def main() -> None:
    """Console entry point."""
    cli(prog_name="aabl")


if __name__ == "__main__":
    sys.exit(main())
