"""Options and option types the `aabl` commands share, and how their summaries, warnings and
failures are printed."""

from __future__ import annotations

import errno
import math
import re
import traceback
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import click

from aabl_cli.core.errors import AablError, GateFailed
from aabl_cli.core.memory import AUTO, parse_size
from aabl_cli.core.text import json_text, printable

ARCH_CHOICES = ("cnn", "resnet18", "resnet34", "vgg16", "mobilenetv2", "densenet121")
# core.loop.SCHEDULES, core.device.PRECISIONS and stages.train.KEEP, spelled out so that `--help` need not import torch
SCHEDULE_CHOICES = ("step", "onecycle")
PRECISION_CHOICES = ("auto", "bf16", "fp32")
KEEP_CHOICES = ("best", "last")
# core.attacks.ATTACKS, and each attack's iterations unless --steps says otherwise
ATTACK_CHOICES = ("pgd", "apgd", "autoattack")
ATTACK_STEPS = {"pgd": 10, "apgd": 100, "autoattack": 100}
ATTACK_HELP = (
    "Attack of the robust accuracy (RA). pgd: the paper's RA, PGD from a random start, --steps (10) steps of "
    "--step-size. apgd: APGD-CE (Croce & Hein 2020), PGD on cross-entropy without a step size to tune: the step "
    "starts at 2 x eps and halves where the loss stops rising, with momentum, and an image counts as fooled if any "
    "iterate fooled the model; its 100 iterations cost about 10x PGD-10. autoattack: the white-box part of "
    "AutoAttack's standard version, the attack behind RobustBench's robust accuracy: APGD-CE, then on the images "
    "still robust APGD-T, APGD on a targeted DLR loss towards each of the 9 classes the model finds likeliest "
    "after the true one (100 iterations each), up to about 10x APGD-CE's cost again. AutoAttack's last two parts, "
    "FAB-T and Square, are not run: on a model that masks its gradients RA can read higher here than under full "
    "AutoAttack.")
# stages.poison.BACKDOORS' keys and what each does, spelled out so that `--help` need not import torch
BACKDOOR_CHOICES = ("badnets", "blend", "trojan", "wanet", "iab", "ssba", "clb")
BACKDOOR_HELP = """\b
Backdoors (the paper's seven, with its defaults):
  badnets  3x3 white square in the bottom-right corner (sizes scale from 32 px)
  blend    a fixed pattern (--pattern) laid over the image at opacity 0.1
  trojan   a fixed 5x7 watermark-like colour patch in the bottom-left corner
  wanet    a smooth warp (k=4, s=0.5); twice as many other images get a jittered
           warp and keep their label (kind "noise", poisoned 0 in poison.csv)
  iab      input-aware pattern and mask from networks trained on DATA (--epochs)
  ssba     invisible residual (at most 8/255 per pixel) from an encoder trained
           on DATA (--epochs)
  clb      clean label: target-class images pushed off their label by PGD
           (16/255, 30 steps) against a model trained on DATA, then a 3x3
           checkerboard in each corner; --rate is the share of the target class
iab and ssba write trigger.safetensors beside poison.csv; the --test set of the
same backdoor needs it back: --trigger DIR/trigger.safetensors."""


# An exponent past float range: Fraction("1e999999999") would compute 10**999999999 (minutes, gigabytes).
_HUGE_EXPONENT = re.compile(r"[eE][+-]?0*[1-9]\d{3,}")


def parse_fraction(text: str) -> Fraction:
    """`Fraction(text)` (never eval), refusing exponents that no budget or share needs before they cost
    minutes. Raises ValueError or ZeroDivisionError for text that is not a number."""
    if _HUGE_EXPONENT.search(text):
        raise ValueError(f"exponent out of range in {text!r}")
    return Fraction(text)


class Budget(click.ParamType):
    """A budget in [0, 1] pixel units: `8/255`, `0.0314` or `0` (fractions, never eval)."""

    name = "BUDGET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = parse_fraction(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{text!r} is not a number or fraction; write it like 8/255 or 0.0314", param, ctx)
        if number < 0:
            self.fail(f"{text} is negative; a budget is at least 0 (e.g. 8/255)", param, ctx)
        if number > 1:
            self.fail(f"{text} is above 1 (budgets are in [0, 1] pixel units): did you mean {text}/255?", param, ctx)
        return float(number)


class ShareType(click.ParamType):
    """A share of the data set in [0, 1]: `0.1`, `1/10` or `10%`."""

    name = "FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = parse_fraction(text[:-1]) / 100 if text.endswith("%") else parse_fraction(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{text!r} is not a fraction; write it like 0.1, 1/10 or 10%", param, ctx)
        if not 0 <= number <= 1:
            self.fail(f"{text} is outside [0, 1]; write a share such as 0.1 or 10%", param, ctx)
        return float(number)


class FiniteFloat(click.FloatRange):
    """A finite number, within optional bounds. click's FloatRange takes `nan` (every comparison
    with it is false, so no bound refuses it) and `inf` or `1e999`; no option of aabl means either."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; give an ordinary number such as 0.5 or 1e-3", param, ctx)
        return number

    def _describe_range(self) -> str:  # no "[x<=None]" in --help for an unbounded number
        return "" if self.min is None and self.max is None else super()._describe_range()


class MemorySize(click.ParamType):
    """A memory size: `512M`, `20G`, `1.5G` (binary units) or a number of bytes; or `auto`."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            return parse_size(text)
        except ValueError as err:
            self.fail(str(err), param, ctx)


BUDGET = Budget()
SHARE = ShareType()
MEMORY_SIZE = MemorySize()


# Environment faults the user can fix wherever they strike (exit 1): what to do about each.
_WRITABLE = "fix its permissions or choose a writable --workdir / --out"
ENVIRONMENT_FIXES = {errno.ENOSPC: "free some space or choose another --workdir / --out",
                     errno.EDQUOT: "free some space (disk quota) or choose another --workdir / --out",
                     errno.EROFS: "choose a writable --workdir / --out", errno.EACCES: _WRITABLE,
                     errno.EPERM: _WRITABLE}


class AablGroup(click.Group):
    """Turns the tool's errors into one line on stderr and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AablError as err:
            self._fail(ctx, f"error: {err}", err.exit_code)
        except GateFailed as err:
            self._fail(ctx, f"gate failed: {err}", GateFailed.exit_code)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted: outputs were left as they were before this command", 130)
        except click.ClickException as err:  # usage errors: click prints them, after we escape them
            err.message = printable(err.message)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - the last line of defence for a CLI
            fix = ENVIRONMENT_FIXES.get(err.errno) if isinstance(err, OSError) else None
            if fix is not None:
                where = f" ({err.filename})" if err.filename else ""
                self._fail(ctx, f"error: {err.strerror}{where}; {fix}", 1)
            hint = "" if ctx.obj and ctx.obj.get("debug") else " (run with --debug for the traceback)"
            self._fail(ctx, f"error: {type(err).__name__}: {err}{hint}", 1)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        """One line on stderr, its control characters escaped: a message may quote a file name."""
        if ctx.obj and ctx.obj.get("debug"):
            click.echo(printable(traceback.format_exc().rstrip("\n"), multiline=True), err=True)
        click.echo(printable(message), err=True)
        ctx.exit(code)


def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Python's warnings on stderr as `warning: ...`, escaped like every other line."""
    click.echo(printable(f"warning: {message}"), err=True)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every stage shares."""
    options = [
        click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("aabl-out"),
                     show_default=True, help="Work directory shared by scan, split and train."),
        click.option("--device", default="auto", show_default=True,
                     help="auto picks CUDA, then MPS, then the CPU; or cpu, cuda, cuda:N, mps."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds everything; a CPU run repeats bit for bit."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where decoded datasets are cached.  [default: $XDG_CACHE_HOME/aabl]"),
        click.option("--on-bad-file", type=click.Choice(["error", "skip"]), default="error", show_default=True,
                     help="error stops at an unreadable image; skip leaves it out and lists it in the summary."),
        click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
                     help="Largest image read, in pixels (width x height), checked from the file's header before "
                          "decoding: a small file can claim gigabytes of pixels (a decompression bomb). A larger "
                          "image counts as a bad file (see --on-bad-file)."),
        precision_option(),
        data_memory_option(),
        click.option("--quiet", is_flag=True, help="No progress bars or log lines."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def precision_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--precision, of every command that runs a network on many images (scan, train, evaluate, run)."""
    return click.option(
        "--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
        help="Arithmetic of the forward passes. auto: bf16 autocast on CUDA, float32 elsewhere. bf16: bf16 "
             "autocast on the CPU too, with channels_last tensors: on CPUs with AMX (Intel Sapphire Rapids and "
             "later) several times faster for --arch cnn (2.7x and 4.4x measured on two such machines, plain "
             "training at batch 128 on one thread); on a CPU without bf16 instructions (no AMX or "
             "AVX512-BF16, e.g. AVX2 only) it is emulated, 10-35x slower than float32 for --arch cnn, and aabl "
             "warns. Numbers differ from float32 by bf16 rounding. fp32: float32 everywhere, also on CUDA, "
             "where it gives up the bf16 speed-up. Attack perturbations stay float32 in every mode.")


def data_memory_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--data-memory, of every command that reads a whole image folder into a network (scan, train, evaluate,
    run)."""
    return click.option(
        "--data-memory", type=MEMORY_SIZE, default=AUTO, show_default=True,
        help="Memory the decoded images may take. A set that fits is held whole (on the GPU with CUDA); a larger "
             "one is streamed from the decode cache batch by batch, read ahead on a background thread (pinned "
             "and copied asynchronously on CUDA), with the same batches and results. auto: half of the GPU's "
             "free memory with CUDA, and half of the host's available memory (shared by torchrun's processes "
             "on the machine). SIZE: e.g. 512M or 20G (binary units). The stage's JSON records the path taken "
             "and why as data_path; it is not a setting, so changing it redoes nothing.")


def recipe_options(prefix: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`aabl train`'s --schedule, --ema and --keep; `aabl run` spells the first two --train-schedule and
    --train-ema (`prefix` "train-", the help then starting "train: ")."""
    def text(help_text: str) -> str:
        return f"train: {help_text[0].lower()}{help_text[1:]}" if prefix else help_text

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option(
                f"--{prefix}schedule", type=click.Choice(SCHEDULE_CHOICES), default="step", show_default=True,
                help=text("Learning-rate schedule. step: the paper's, the rate drops x0.1 at each of --milestones. "
                          "onecycle: set every batch, rising linearly from 0 to the learning rate over the first 40 % "
                          "of the iterations, then falling linearly to 0 at the end (Smith; Wong, Rice & Kolter "
                          "2020); it takes no --milestones. Neither costs anything per batch.")),
            click.option(
                f"--{prefix}ema", type=FiniteFloat(0, 1, max_open=True), default=0.0, show_default=True,
                metavar="DECAY",
                help=text("Validate and save an exponential moving average of the weights and batch-norm "
                          "statistics, updated after every optimizer step with this decay (0.995 averages over "
                          "roughly the last 200 steps; warm-up: min(DECAY, (1 + t) / (10 + t)) after t steps). 0: "
                          "off. Costs a second copy of the model in memory and in the resume state, and a few "
                          "element-wise operations per step.")),
            click.option(
                "--keep", type=click.Choice(KEEP_CHOICES), default="best", show_default=True,
                help=text("Which epoch's weights are saved as model.safetensors when --val is given: best, the "
                          "epoch with the highest val_ra (the later on a tie), which guards against catastrophic "
                          "overfitting (a collapse of val_ra below half its best is logged and recorded in "
                          "train.json); last, the last epoch. Without --val the last epoch is saved. best costs "
                          "another copy of the weights in memory and in the resume state.")),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return wrap


def training_options(default_arch: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--arch", type=click.Choice(ARCH_CHOICES), default=default_arch, show_default=True,
                         help="Network; cnn is a small residual CNN that is quick on a CPU."),
            click.option("--batch-size", type=click.IntRange(2), default=128, show_default=True,
                         help="Training batch size (images)."),
            click.option("--image-size", type=click.IntRange(16, 1024), default=None,
                         help="Resize images to N x N px.  [default: the most common size in the folder]"),
            click.option("--resume", is_flag=True,
                         help="Continue an interrupted run of this stage from its last finished epoch."),
            click.option("--compile", is_flag=True,
                         help="torch.compile the training and attack passes: pays off on a GPU for long runs "
                              "(the first batches wait a minute or more for compilation; the last partial "
                              "batch of each epoch is dropped so shapes stay fixed)."),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return wrap


def emit(summary: dict[str, Any], as_json: bool, text: str) -> None:
    """Print a command's summary on stdout: as JSON (non-finite numbers as null, every control
    character escaped) or as `text` with control characters escaped (`text.printable`)."""
    from aabl_cli.core.distributed import launched_as_main

    if not launched_as_main():  # under torchrun rank 0 alone reports
        return
    if as_json:
        click.echo(json_text(summary, indent=2, default=str))
    else:
        click.echo(printable(text, multiline=True))


def check_run_options(o: dict[str, Any]) -> None:
    if o["method"] == "quantile" and o["fraction"] is None:
        raise click.BadParameter("--method quantile needs --fraction (the share to isolate)", param_hint="--fraction")
    if o["method"] == "fixed" and o["threshold"] is None:
        raise click.BadParameter("--method fixed needs --threshold", param_hint="--threshold")


def check_attack_options(attack: str) -> None:
    """--step-size is PGD's: refuse it beside an attack that chooses its own steps, rather than ignore it."""
    ctx = click.get_current_context()
    if attack != "pgd" and ctx.get_parameter_source("step_size") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"--step-size sets PGD's step; {attack} chooses its own (2 x eps, halved as the "
                               "loss stops rising): drop --step-size, or use --attack pgd", ctx=ctx)


def scaled_lr(options: dict[str, Any], name: str) -> float:
    """SGD's learning rate: left at its default it follows the effective batch (batch per process x
    torchrun processes) by the linear scaling rule, 0.1 x batch / 128; given explicitly it is kept."""
    from aabl_cli.core.distributed import env_world_size, launched_as_main
    from aabl_cli.core.progress import log

    lr = options[name]
    effective = options["batch_size"] * env_world_size()
    if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT or effective == 128:
        return lr
    scaled = lr * effective / 128
    log(f"train: effective batch {effective}: learning rate scaled to {scaled:.4g} "
        f"(pass --{name.replace('_', '-')} to set it yourself)", quiet=options["quiet"] or not launched_as_main())
    return scaled


def parse_milestones(text: str | None, epochs: int, schedule: str = "step") -> list[int] | None:
    if text is None:
        return None
    if schedule != "step":
        raise click.BadParameter(f"the milestones of the step schedule do not apply to {schedule}, which sets the "
                                 "rate every batch: drop --milestones, or use the step schedule",
                                 param_hint="--milestones")
    try:
        values = sorted(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise click.BadParameter(f"{text!r}: give epochs as integers, e.g. 50,75,90",
                                 param_hint="--milestones") from err
    if any(not 0 < v <= epochs for v in values):
        raise click.BadParameter(f"{text!r}: every milestone must lie in 1..{epochs}", param_hint="--milestones")
    return values


def one_backdoor(backdoor: str | None, old_backdoor: str | None) -> str:
    """`aabl poison`'s backdoor: `--backdoor`, or `--attack`, its earlier name, which old command lines use."""
    ctx = click.get_current_context()
    if backdoor is not None and old_backdoor is not None and backdoor != old_backdoor:
        raise click.UsageError(f"--backdoor {backdoor} and --attack {old_backdoor} disagree; --attack is the earlier "
                               "name of --backdoor: give --backdoor alone", ctx=ctx)
    chosen = backdoor or old_backdoor
    if chosen is None:
        raise click.MissingParameter(ctx=ctx, param_type="option", param_hint="'--backdoor'")
    return chosen


def run_stage_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """`aabl run`'s options of the stages, those `run_stage_options` hands to each: shared ones, then
    scan's (--scan-*), split's, train's (--train-* and train's own names)."""
    options = [
        click.option("--arch", type=click.Choice(ARCH_CHOICES), default="resnet18", show_default=True,
                     help="Network of both scan and train; cnn is a small residual CNN that is quick on a CPU."),
        click.option("--batch-size", type=click.IntRange(2), default=128, show_default=True,
                     help="Training batch size of scan and train (per process under torchrun)."),
        click.option("--image-size", type=click.IntRange(16, 1024), default=None,
                     help="Resize images to N x N px.  [default: the most common size in the folder]"),
        click.option("--compile", is_flag=True, help="torch.compile scan's and train's passes."),
        click.option("--scan-epochs", type=click.IntRange(1), default=20, show_default=True,
                     help="scan: naive training epochs (Adam)."),
        click.option("--scan-lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
                     help="scan: Adam learning rate."),
        click.option("--scan-eps", type=BUDGET, default="2/255", show_default=True,
                     help="scan: iFGSM scoring budget."),
        click.option("--scan-step-size", type=BUDGET, default="2/255", show_default=True,
                     help="scan: iFGSM step size."),
        click.option("--scan-steps", type=click.IntRange(1), default=5, show_default=True, help="scan: iFGSM steps."),
        click.option("--method", type=click.Choice(["otsu", "quantile", "fixed"]), default="otsu", show_default=True,
                     help="split: otsu, quantile (--fraction) or fixed (--threshold)."),
        click.option("--fraction", type=SHARE, default=None, help="split, --method quantile: the share to isolate."),
        click.option("--threshold", type=FiniteFloat(), default=None,
                     help="split, --method fixed: isolate scores below this."),
        click.option("--min-isolated", type=SHARE, default="0.10", show_default=True,
                     help="split, Otsu: isolate at least this share."),
        click.option("--link", type=click.Choice(["copy", "hardlink", "symlink"]), default="copy", show_default=True,
                     help="split: how kept/ and isolated/ get their files."),
        click.option("--isolate-misfit", is_flag=True,
                     help="split: also isolate every image the naive model puts in another class than its own."),
        click.option("--fail-over", type=SHARE, default=None,
                     help="CI gate: after the split, exit 3 (before training) when more than this share is "
                          "isolated (clean sets lose 25-50 % too: a budget, not a backdoor test)."),
        click.option("--fail-on-suspect", is_flag=True,
                     help="CI gate: after the split, exit 3 (before training) when the verdict is "
                          "'backdoor suspected'."),
        click.option("--train-epochs", type=click.IntRange(1), default=100, show_default=True, help="train: epochs."),
        click.option("--train-eps", type=BUDGET, default="8/255", show_default=True,
                     help="train: PGD budget; 0 trains plainly."),
        click.option("--train-step-size", type=BUDGET, default="2/255", show_default=True,
                     help="train: PGD step size."),
        click.option("--train-steps", type=click.IntRange(1), default=10, show_default=True, help="train: PGD steps."),
        click.option("--adv-method", type=click.Choice(["pgd", "fgsm-rs"]), default="pgd", show_default=True,
                     help="train: pgd, or fgsm-rs (one FGSM step of 1.25 x eps from a random start)."),
        click.option("--train-lr", type=FiniteFloat(min=0, min_open=True), default=0.1, show_default=True,
                     help="train: SGD learning rate; left at its default it scales with the effective batch."),
        click.option("--momentum", type=FiniteFloat(0, 1), default=0.9, show_default=True, help="train: SGD momentum."),
        click.option("--weight-decay", type=FiniteFloat(min=0), default=5e-4, show_default=True,
                     help="train: SGD weight decay."),
        click.option("--milestones", default=None,
                     help="train: epochs at which the learning rate drops x0.1.  [default: 50 %, 75 % and 90 %]"),
        recipe_options("train-"),
        click.option("--val", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="train: image folder evaluated after each epoch."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_stage_options(o: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """`aabl run`'s options as each stage's keyword options: (common to scan and train, scan's, split's,
    train's). A stage's own flags carry its name (--scan-epochs -> scan's `epochs`)."""
    common = {k: o[k] for k in ("device", "cache_dir", "on_bad_file", "max_image_pixels", "image_size",
                                "data_memory")}
    shared = {k: o[k] for k in ("arch", "batch_size", "seed", "compile", "precision")}
    scan = {"epochs": o["scan_epochs"], "lr": o["scan_lr"], "eps": o["scan_eps"], "step_size": o["scan_step_size"],
            "steps": o["scan_steps"], "resume": "auto", **shared}
    split = {k: o[k] for k in ("method", "fraction", "threshold", "min_isolated", "link", "fail_over",
                               "fail_on_suspect", "isolate_misfit")}
    train = {"epochs": o["train_epochs"], "eps": o["train_eps"], "step_size": o["train_step_size"],
             "steps": o["train_steps"], "adv_method": o["adv_method"], "lr": o["train_lr"], "momentum": o["momentum"],
             "weight_decay": o["weight_decay"], "schedule": o["train_schedule"], "ema": o["train_ema"],
             "keep": o["keep"], "val": o["val"], "resume": "auto",
             "milestones": parse_milestones(o["milestones"], o["train_epochs"], o["train_schedule"]), **shared}
    return common, scan, split, train
