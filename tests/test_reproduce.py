"""benchmarks/reproduce.py: finished configurations are skipped and its tables say what was measured."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import make_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def reproduce(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def _result(dataset, backdoor, mode, **numbers):
    row = {"dataset": dataset, "backdoor": backdoor, "mode": mode, "category": "A", "arch": "cnn", "scan_epochs": 20,
           "train_epochs": 20, "train_steps": 5, "train_batch": 64, "train_lr": 0.02, "train_images": 4000,
           "test_images": {"cifar10": 1000, "gtsrb": 1075}[dataset], "seed": "0",
           "device": "CPU (x86_64, 2 cores)", "torch": "2.x", "seconds": {"train": 1200.0}, "acc": 0.5, "ra": 0.25,
           "asr": 0.03, "target_rate": 0.02, "finished": True}
    if mode == "aabl":
        row.update(kept_share=0.8, rho_vul=0.0125, recall=0.9, verdict="backdoor suspected", naive_acc=0.6,
                   naive_asr=0.95, naive_target_rate=0.1)
    row.update(numbers)
    return row


def _earlier(row):
    """`row` as an earlier version stored it: `attack` for the backdoor, `gamma` for the kept share."""
    names = {"backdoor": "attack", "kept_share": "gamma"}
    return {names.get(k, k): v for k, v in row.items()}


def test_tables_hold_ours_beside_the_papers_and_list_what_is_missing(reproduce):
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(_result("cifar10", "badnets", "aabl")))
    (store / "cifar10-badnets-advtrain.json").write_text(  # a result file of an earlier version reads the same
        json.dumps(_earlier(_result("cifar10", "badnets", "advtrain", asr=0.99))))
    text = reproduce.render("cpu-small")
    assert f"2 of {len(reproduce.configs_of('cpu-small'))} configurations finished" in text
    # Table 1 row: our gamma, rho_vul, recall, naive ASR; the paper's gamma and rho_vul for BadNets
    assert ("| cifar10 | badnets | A | 80.0 | 1.25 | 90.0 | backdoor suspected | 60.0 | 95.0 | 10.0 | 82.34 | 0.13 |"
            in text)
    # Table 3 rows: A-ABL beside the paper's A-ABL, Adv. Train beside the paper's Adv. Train
    # ... and the epochs each trained for, and its minutes
    assert "| cifar10 | badnets | A-ABL | 50.0 | 25.0 | 3.0 | 2.0 | 83.59 | 46.63 | 1.26 | 20 | 20 |" in text
    assert "| cifar10 | badnets | Adv. Train | 50.0 | 25.0 | 99.0 | 2.0 | 83.72 | 46.28 | 100.00 | 20 | 20 |" in text
    assert "no longer gives" not in text
    assert "cifar10/none/aabl" in text.split("Not yet run")[1]
    assert "cifar10/badnets/aabl" not in text.split("Not yet run")[1]


def test_a_configuration_still_training_shows_its_split_only(reproduce):
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    partial = _result("cifar10", "trojan", "aabl", finished=False)
    del partial["acc"], partial["ra"], partial["asr"]
    (store / "cifar10-trojan-aabl.json").write_text(json.dumps(partial))
    text = reproduce.render("cpu-small")
    assert "0 of" in text
    assert "| cifar10 | trojan | A | 80.0 |" in text  # Table 1 row
    assert "| cifar10 | trojan | A-ABL |" not in text  # no final model yet
    assert "cifar10/trojan/aabl" in text.split("Not yet run")[1]


def test_markdown_keeps_the_text_around_the_tables(reproduce, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Title\n\nhand-written intro\n\n{reproduce.MARK_BEGIN}\nold\n{reproduce.MARK_END}\n\n"
                  "## Findings\nkept\n")
    (reproduce.RESULTS / "cpu-small").mkdir(parents=True)
    (reproduce.RESULTS / "cpu-small" / "gtsrb-none-aabl.json").write_text(
        json.dumps(_result("gtsrb", "none", "aabl", asr=None, rho_vul=None, recall=None, naive_asr=None)))
    reproduce.write_markdown(md, ["cpu-small", "gpu"])
    text = md.read_text()
    assert text.startswith("# Title\n\nhand-written intro\n")
    assert text.endswith("## Findings\nkept\n")
    assert "old" not in text
    assert "| gtsrb | none | A | 80.0 | - | - |" in text
    assert "Scale `gpu`" not in text  # no results at that scale


def test_finished_configurations_are_not_run_again(reproduce, tmp_path, monkeypatch):
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(_result("cifar10", "badnets", "aabl")))
    (store / "cifar10-clb-aabl.json").write_text(json.dumps(_result("cifar10", "clb", "aabl", finished=False)))
    ran = []

    def fake_run(dataset, attack, mode, args, on_split):
        ran.append((dataset, attack, mode))
        return _result(dataset, attack, mode)

    monkeypatch.setattr(reproduce, "run_config", fake_run)
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "cpu-small", "--only",
                                      "cifar10/badnets,cifar10/clb,cifar10/blend/advtrain",
                                      "--md", str(md), "--work", str(tmp_path / "work")])
    reproduce.main()
    assert ran == [("cifar10", "clb", "aabl"), ("cifar10", "blend", "advtrain")]  # unfinished ones run again
    assert json.loads((store / "cifar10-blend-advtrain.json").read_text())["seconds"]["total"] >= 0
    assert "| cifar10 | blend | Adv. Train |" in md.read_text()


def test_refresh_rederives_numbers_but_keeps_the_runs_times(reproduce, tmp_path, monkeypatch):
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    old = _result("cifar10", "badnets", "aabl", seconds={"train": 1500.0}, date="2026-01-01")
    del old["target_rate"]
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(old))
    (store / "cifar10-trojan-aabl.json").write_text(json.dumps(_result("cifar10", "trojan", "aabl")))
    work = tmp_path / "work"
    (work / "cpu-small" / "cifar10" / "badnets" / "aabl" / "train").mkdir(parents=True)
    (work / "cpu-small" / "cifar10" / "badnets" / "aabl" / "train" / "train.json").write_text("{}")
    ran = []

    def fake_run(dataset, attack, mode, args, on_split=None):
        ran.append((dataset, attack, mode))
        return _result(dataset, attack, mode, target_rate=0.07, seconds={}, date="2026-11-28")

    monkeypatch.setattr(reproduce, "run_config", fake_run)
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "cpu-small", "--only",
                                      "cifar10/badnets,cifar10/trojan", "--refresh", "--md", str(md),
                                      "--work", str(work)])
    reproduce.main()
    assert ran == [("cifar10", "badnets", "aabl")]  # trojan has no work directory here: left as stored
    refreshed = json.loads((store / "cifar10-badnets-aabl.json").read_text())
    assert refreshed["target_rate"] == 0.07
    assert refreshed["seconds"] == {"train": 1500.0} and refreshed["date"] == "2026-01-01"
    assert "| cifar10 | badnets | A-ABL | 50.0 | 25.0 | 3.0 | 7.0 |" in md.read_text()


def test_a_result_from_other_settings_is_marked_and_trained_again(reproduce, tmp_path, monkeypatch):
    """GTSRB trains 40 epochs at the cpu-small scale: a stored 20-epoch GTSRB result is shown as stale, and a
    rerun trains it again while the CIFAR-10 one (20 epochs there) stays."""
    assert reproduce.settings("cpu-small", "gtsrb")["train_epochs"] == 40
    assert reproduce.settings("cpu-small", "cifar10")["train_epochs"] == 20
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    (store / "gtsrb-badnets-aabl.json").write_text(json.dumps(_result("gtsrb", "badnets", "aabl")))
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(_result("cifar10", "badnets", "aabl")))
    text = reproduce.render("cpu-small")
    assert "| gtsrb | badnets | A-ABL | 50.0 | 25.0 | 3.0 | 2.0 | 88.65 | 60.09 | 0.01 | 20 | 20 |" in text
    assert "no longer gives (a rerun trains them again): gtsrb/badnets/aabl." in text
    ran = []

    def fake_run(dataset, attack, mode, args, on_split):
        ran.append((dataset, attack, mode))
        return _result(dataset, attack, mode, train_epochs=40)

    monkeypatch.setattr(reproduce, "run_config", fake_run)
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "cpu-small", "--only",
                                      "gtsrb/badnets,cifar10/badnets", "--md", str(md),
                                      "--work", str(tmp_path / "work")])
    reproduce.main()
    assert ran == [("gtsrb", "badnets", "aabl")]
    assert "| gtsrb | badnets | A-ABL | 50.0 | 25.0 | 3.0 | 2.0 | 88.65 | 60.09 | 0.01 | 40 | 20 |" in md.read_text()
    assert "no longer gives" not in md.read_text()


def _trained(reproduce, wd, data, scale, **edits):
    """A finished training in `wd` as `aabl train` records it for `scale`'s options on `data` (with `edits`)."""
    args = argparse.Namespace(seed="0")
    options = reproduce.train_options(scale, args)
    fingerprint, _, size = reproduce.peek_image_folder(data)
    settings = reproduce.settings_for(reproduce.train, reproduce.train_settings, options, data=data, image_size=size,
                                      distributed={"world_size": 1, "backend": None})
    (wd / "train").mkdir(parents=True)
    (wd / "train" / "train.json").write_text(json.dumps({"settings": {**settings, **edits},
                                                         "dataset_fingerprint": fingerprint}))
    return options


def test_a_stale_training_is_set_aside_with_its_evaluation(reproduce, tmp_path):
    data, wd = make_folder(tmp_path / "kept", classes=2, per_class=2), tmp_path / "aabl"
    cifar_options = _trained(reproduce, wd, data, reproduce.settings("cpu-small", "cifar10"))
    (wd / "final-eval.json").write_text("{}")
    reproduce.set_aside_stale_training(wd, data, cifar_options)  # the same settings: kept
    assert (wd / "train" / "train.json").exists() and (wd / "final-eval.json").exists()
    gtsrb = reproduce.train_options(reproduce.settings("cpu-small", "gtsrb"), argparse.Namespace(seed="0"))
    reproduce.set_aside_stale_training(wd, data, gtsrb)  # 40 epochs there
    assert not (wd / "train").exists() and not (wd / "final-eval.json").exists()
    assert json.loads((wd / "train-20ep" / "train.json").read_text())["settings"]["epochs"] == 20
    assert (wd / "final-eval-20ep.json").exists()


@pytest.mark.parametrize("edit", [{"lr": 0.05}, {"momentum": 0.5}, {"image_size": [8, 8]}, {"new_knob": 1}])
def test_a_training_with_any_other_recorded_setting_is_set_aside_too(reproduce, tmp_path, edit):
    """Every setting train.json records counts, as in `aabl run`: not only the few the scale names."""
    data, wd = make_folder(tmp_path / "kept", classes=2, per_class=2), tmp_path / "aabl"
    options = _trained(reproduce, wd, data, reproduce.settings("cpu-small", "cifar10"), **edit)
    reproduce.set_aside_stale_training(wd, data, options)
    assert not (wd / "train").exists() and (wd / "train-20ep" / "train.json").exists()


def test_a_training_of_other_images_is_set_aside(reproduce, tmp_path):
    data, wd = make_folder(tmp_path / "kept", classes=2, per_class=2), tmp_path / "aabl"
    options = _trained(reproduce, wd, data, reproduce.settings("cpu-small", "cifar10"))
    (data / "class_0" / "img_000.png").write_bytes((data / "class_1" / "img_000.png").read_bytes())
    reproduce.set_aside_stale_training(wd, data, options)
    assert (wd / "train-20ep" / "train.json").exists()


def test_a_scan_from_other_settings_stops_the_configuration(reproduce, tmp_path, monkeypatch):
    """The split and the training stand on the scan, so a scan with another epoch count is not reused
    under the new settings' name: the run stops and says what to remove."""
    from PIL import Image

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "0.png")
    monkeypatch.setattr(reproduce, "prepare_data", lambda dataset, args, scale: (tmp_path / "data", tmp_path / "data"))
    monkeypatch.setattr(reproduce, "poison", lambda attack, train, test, base, args: (tmp_path / "data", None))
    wd = tmp_path / "work" / "cpu-small" / "cifar10" / "badnets" / "aabl"
    (wd / "scan").mkdir(parents=True)
    (wd / "scan" / "scan.json").write_text(json.dumps({"settings": {"arch": "cnn", "epochs": 10}}))
    args = argparse.Namespace(scale="cpu-small", work=tmp_path / "work", seed="0", device="cpu", threads=1)
    with pytest.raises(SystemExit, match="ran with other settings than the cpu-small scale's; remove"):
        reproduce.run_config("cifar10", "badnets", "aabl", args)


def test_the_cpu_scale_runs_the_fast_recipe_in_bf16(reproduce):
    """The cpu scale trains with FGSM-RS, the one-cycle schedule and weight averaging, and scans in bf16;
    the flags it passes are the ones aabl train and aabl scan take."""
    args = argparse.Namespace(seed="0")
    cifar = reproduce.settings("cpu", "cifar10")
    assert reproduce.train_options(cifar, args) == {
        "arch": "cnn", "epochs": 30, "adv_method": "fgsm-rs", "schedule": "onecycle", "ema": 0.995,
        "precision": "bf16", "batch_size": 128, "lr": 0.2, "seed": 0}
    assert reproduce.scan_options(cifar, args) == {"arch": "cnn", "epochs": 8, "precision": "bf16", "seed": 0}
    assert reproduce.settings("cpu", "gtsrb")["train_images"] is None  # every image of every class
    flags = reproduce.flags(reproduce.train_options(cifar, args))
    assert flags[flags.index("--adv-method") + 1] == "fgsm-rs" and "--steps" not in flags
    # the earlier scale keeps its PGD-5 recipe and names no fast-recipe option
    small = reproduce.train_options(reproduce.settings("cpu-small", "cifar10"), args)
    assert small["steps"] == 5 and not {"adv_method", "schedule", "ema", "precision"} & small.keys()


def test_subset_of_size_0_copies_every_image(tmp_path):
    import subprocess

    src = make_folder(tmp_path / "src", classes=3, per_class=5)
    (src / "class_0" / "extra.png").write_bytes((src / "class_0" / "img_000.png").read_bytes())
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "subset.py"), src, tmp_path / "all", "--size", "0"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "subset.py"), src, tmp_path / "even", "--size", "9"],
                   check=True, capture_output=True)
    assert len(list((tmp_path / "all").rglob("*.png"))) == 16  # the larger class whole
    assert len(list((tmp_path / "even").rglob("*.png"))) == 9


def test_the_scales_precision_and_the_isolated_sets_precision_are_two_keys(reproduce, tmp_path):
    """A result records the arithmetic it ran in (`precision`, from the scale) and the isolated set's
    precision against the ground truth (`isolated_precision`); an earlier file's float `precision` is the latter."""
    store = reproduce.RESULTS / "cpu"
    store.mkdir(parents=True)
    row = _result("cifar10", "badnets", "aabl", **{**reproduce.settings("cpu", "cifar10"), "train_images": 20000},
                  isolated_precision=0.25)
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(row))
    (tmp_path / "earlier.json").write_text(json.dumps(_result("cifar10", "none", "aabl", precision=0.5)))
    assert reproduce.load_result(store / "cifar10-badnets-aabl.json")["precision"] == "bf16"
    earlier = reproduce.load_result(tmp_path / "earlier.json")
    assert earlier["isolated_precision"] == 0.5 and "precision" not in earlier
    text = reproduce.render("cpu")
    assert "FGSM-RS adversarial training (onecycle schedule, weight averaging 0.995, bf16)" in text


def test_the_control_trains_the_aabl_kept_set_without_the_attack(reproduce, tmp_path, monkeypatch):
    """control = the A-ABL configuration's kept set, the same recipe with --eps 0; without that split
    it stops and says what to run first."""
    monkeypatch.setattr(reproduce, "prepare_data", lambda dataset, args, scale: (tmp_path / "d", tmp_path / "d"))
    monkeypatch.setattr(reproduce, "poison", lambda attack, train, test, base, args: (tmp_path / "d", None))
    monkeypatch.setattr(reproduce, "list_image_folder", lambda path: argparse.Namespace(files=[1, 2, 3, 4]))
    args = argparse.Namespace(scale="cpu", work=tmp_path / "work", seed="0", device="cpu", threads=1)
    with pytest.raises(SystemExit, match="trains the kept set of cifar10/blend/aabl: run that first"):
        reproduce.run_config("cifar10", "blend", "control", args)

    split = tmp_path / "work" / "cpu" / "cifar10" / "blend" / "aabl" / "split"
    make_folder(split / "kept", classes=2, per_class=2)
    (split / "split.json").write_text("{}")
    calls = []

    def fake_aabl(*argv, threads=None):
        calls.append([str(a) for a in argv])
        raise SystemExit("stop here")

    monkeypatch.setattr(reproduce, "aabl", fake_aabl)
    with pytest.raises(SystemExit, match="stop here"):
        reproduce.run_config("cifar10", "blend", "control", args)
    train_call = calls[0]
    assert train_call[:2] == ["train", str(split / "kept")]
    assert train_call[train_call.index("--eps") + 1] == "0"
    assert train_call[train_call.index("--adv-method") + 1] == "fgsm-rs"  # the rest of the recipe as A-ABL's
    assert train_call[train_call.index("--workdir") + 1].endswith("blend/control")


def test_the_second_half_table_reads_each_category_b_row_by_its_thresholds(reproduce):
    b = {"category": "B", "naive_target_rate": 0.05}
    rows = [
        # implanted (naive lift 90), A-ABL 2 points, the control keeps 70: suppressed
        _result("gtsrb", "blend", "aabl", **b, naive_asr=0.95, recall=0.3, asr=0.04, target_rate=0.02),
        _result("gtsrb", "blend", "control", category="B", asr=0.75, target_rate=0.05),
        _result("gtsrb", "blend", "advtrain", category="B", asr=0.55, target_rate=0.03),
        # implanted, but A-ABL keeps 30 points: the claim fails
        _result("cifar10", "ssba", "aabl", **b, naive_asr=0.92, asr=0.33, target_rate=0.03),
        _result("cifar10", "ssba", "control", category="B", asr=0.90, target_rate=0.02),
        # the control lost it too
        _result("cifar10", "wanet", "aabl", **b, naive_asr=0.90, asr=0.03, target_rate=0.02),
        _result("cifar10", "wanet", "control", category="B", asr=0.10, target_rate=0.02),
        # never implanted
        _result("cifar10", "blend", "aabl", **b, naive_asr=0.30, asr=0.03, target_rate=0.02),
        # category A rows are not in this table
        _result("cifar10", "badnets", "aabl"),
    ]
    text = "\n".join(reproduce.second_half(rows))
    assert "| gtsrb | blend | 70.0 | 90.0 | 2.0 | 70.0 | 52.0 | suppressed by adversarial training |" in text
    assert "| cifar10 | ssba | 10.0 | 87.0 | 30.0 | 88.0 | - | NOT suppressed: the claim fails here |" in text
    assert "| cifar10 | wanet |" in text and "control lost the backdoor too" in text
    assert "did not implant in the naive model" in text
    assert "badnets" not in text
    assert reproduce.second_half([_result("cifar10", "badnets", "aabl")]) == []


def test_an_unknown_configuration_is_refused_before_anything_runs(reproduce, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "run_config", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--only", "cifar10/blend/contrl", "--md", str(tmp_path / "R.md"),
                                      "--work", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as stop:
        reproduce.main()
    assert stop.value.code == 2
    assert "unknown configuration cifar10/blend/contrl" in capsys.readouterr().err


def test_the_paper_recipe_mode_trains_the_kept_set_with_pgd10_and_is_shown_beside_the_fast_one(reproduce):
    args = argparse.Namespace(seed="0")
    fast = reproduce.train_options(reproduce.settings("cpu", "cifar10"), args)
    paper = reproduce.recipe_options(fast, "pgd")
    assert paper["steps"] == 10 and paper["lr"] == 0.1
    assert not {"adv_method", "schedule", "ema"} & paper.keys()  # aabl train's defaults: PGD, step schedule
    assert paper["epochs"] == fast["epochs"] and paper["precision"] == fast["precision"]
    assert reproduce.recipe_options(fast, "aabl") == fast
    rows = [_result("cifar10", "badnets", "aabl", adv_method="fgsm-rs", schedule="onecycle", ema=0.995,
                    ra=0.30, asr=0.05, seconds={"train": 600.0}),
            _result("cifar10", "badnets", "pgd", ra=0.31, asr=0.04, seconds={"train": 3000.0})]
    text = "\n".join(reproduce.recipes_side_by_side(rows))
    assert "| cifar10 | badnets | paper: PGD-10, step schedule | 50.0 | 31.0 | 4.0 | 2.0 | 50 |" in text
    assert "| cifar10 | badnets | fast minus paper (time: ratio) | 0.0 | -1.0 | 1.0 | | 0.20 |" in text
    assert reproduce.recipes_side_by_side(rows[:1]) == []


def test_the_cpu_scale_lists_its_own_configurations(reproduce):
    """The cpu scale runs the second-half rows (control, plain adversarial training) and the paper's recipe
    beside the fast one; the other scales keep the original 13."""
    cpu = reproduce.configs_of("cpu")
    assert ("gtsrb", "blend", "control") in cpu and ("cifar10", "badnets", "pgd") in cpu
    assert cpu.index(("gtsrb", "blend", "aabl")) < cpu.index(("gtsrb", "blend", "control"))  # the split first
    assert reproduce.configs_of("cpu-small") == reproduce.CONFIGS and len(reproduce.CONFIGS) == 13
    assert len(set(cpu)) == len(cpu)
    assert "cifar10/none/aabl" in reproduce.render("cpu").split("Not yet run")[1]


def test_seeds_run_each_configuration_once_a_seed_and_the_spread_is_tabled(reproduce, tmp_path, monkeypatch):
    """--seeds 0,1,2: one run a seed, seed 0 under the plain name and in the main tables, the others with
    -seedN; the spread table gives mean ± sample std over the three."""
    ran = []

    def fake_run(dataset, attack, mode, args, on_split):
        ran.append((dataset, attack, mode, args.seed))
        return _result(dataset, attack, mode, seed=args.seed, acc=0.5 + 0.1 * int(args.seed), recall=0.9)

    monkeypatch.setattr(reproduce, "run_config", fake_run)
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "cpu-small", "--only", "cifar10/badnets",
                                      "--seeds", "0,1,2", "--md", str(md), "--work", str(tmp_path / "work")])
    reproduce.main()
    assert ran == [("cifar10", "badnets", "aabl", s) for s in ("0", "1", "2")]
    store = reproduce.RESULTS / "cpu-small"
    assert sorted(p.name for p in store.glob("*.json")) == [
        "cifar10-badnets-aabl-seed1.json", "cifar10-badnets-aabl-seed2.json", "cifar10-badnets-aabl.json"]
    text = md.read_text()
    assert "1 of" in text.split("configurations finished")[0]  # seed 0 is the main tables' row
    assert text.count("| cifar10 | badnets | A-ABL | 50.0 |") == 1  # seed 0's row, not seeds 1 and 2's
    assert "| A-ABL | 60.0 |" not in text and "| A-ABL | 70.0 |" not in text
    # ACC 50, 60, 70: mean 60.0, sample std 10.0; every seed gave the same recall
    assert "| cifar10 | badnets | A-ABL | 0,1,2 | 80.0 ± 0.0 | 1.2 ± 0.0 | 90.0 ± 0.0 | 60.0 ± 10.0 |" in text
    ran.clear()
    reproduce.main()  # every seed finished: nothing runs again
    assert ran == []


def test_a_single_seed_makes_no_spread_table(reproduce):
    store = reproduce.RESULTS / "cpu-small"
    store.mkdir(parents=True)
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(_result("cifar10", "badnets", "aabl")))
    assert "Spread over seeds" not in reproduce.render("cpu-small")


@pytest.mark.parametrize("seeds", ["0,x", "1,1", "-1", ","])
def test_bad_seeds_are_refused_before_anything_runs(reproduce, tmp_path, monkeypatch, capsys, seeds):
    monkeypatch.setattr(reproduce, "run_config", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--seeds", seeds, "--md", str(tmp_path / "R.md"),
                                      "--work", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as stop:
        reproduce.main()
    assert stop.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_seed_poisons_and_trains_in_its_own_work_directory_on_the_shared_subsets(reproduce, tmp_path,
                                                                                     monkeypatch):
    seen = {}
    monkeypatch.setattr(reproduce, "prepare_data", lambda dataset, args, scale: (tmp_path / "d", tmp_path / "d"))

    def fake_poison(attack, train, test, base, args):
        seen["base"] = base
        raise SystemExit("stop here")

    monkeypatch.setattr(reproduce, "poison", fake_poison)
    for seed, folder in (("0", "badnets"), ("2", "badnets-seed2")):
        args = argparse.Namespace(scale="cpu", work=tmp_path / "work", seed=seed, device="cpu", threads=1)
        with pytest.raises(SystemExit, match="stop here"):
            reproduce.run_config("cifar10", "badnets", "aabl", args)
        assert seen["base"] == tmp_path / "work" / "cpu" / "cifar10" / folder
    assert reproduce.train_options(reproduce.settings("cpu", "cifar10"), args)["seed"] == 2
    assert reproduce.SUBSET_SEED == 0


def test_the_strong_attack_is_measured_beside_pgd_and_tabled(reproduce, tmp_path, monkeypatch):
    """--strong-attack autoattack: one more evaluation of the final model (no ASR set: RA only), kept beside
    the PGD one and reused on a rerun; its RA goes in a table of its own next to PGD-10's."""
    calls = []

    def fake_aabl(*argv, threads=None):
        calls.append([str(a) for a in argv])
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"acc": 0.6, "ra": 0.21, "attack": {"name": argv[argv.index("--attack") + 1]}}))
        return ""

    monkeypatch.setattr(reproduce, "aabl", fake_aabl)
    args = argparse.Namespace(work=tmp_path / "work", device="cpu", threads=1, strong_attack=None)
    assert reproduce.strong_ra(tmp_path / "model.safetensors", tmp_path / "test", tmp_path, args) == {}
    args.strong_attack = "autoattack"
    for _ in range(2):
        found = reproduce.strong_ra(tmp_path / "model.safetensors", tmp_path / "test", tmp_path, args)
    assert found == {"ra_strong": 0.21, "strong_attack": {"name": "autoattack"}}
    assert len(calls) == 1 and "--poisoned" not in calls[0]  # the second call reads the kept evaluation
    assert (tmp_path / "final-eval-autoattack.json").exists()
    rows = [_result("cifar10", "badnets", "aabl", ra=0.25, ra_strong=0.21, strong_attack={"name": "autoattack"}),
            _result("cifar10", "none", "aabl")]
    text = "\n".join(reproduce.under_strong_attack(rows))
    assert "| cifar10 | badnets | A-ABL | 25.0 | autoattack | 21.0 | -4.0 |" in text
    assert "| cifar10 | none |" not in text  # not measured under it
    assert reproduce.under_strong_attack(rows[1:]) == []


def test_a_cpu_without_bf16_instructions_runs_the_scale_in_fp32_and_says_so(reproduce, monkeypatch):
    cifar = reproduce.settings("cpu", "cifar10")
    monkeypatch.setattr(reproduce.torch.cuda, "is_available", lambda: False)
    for native, expected in ((False, "fp32"), (True, "bf16"), (None, "bf16")):
        monkeypatch.setattr(reproduce, "cpu_has_native_bf16", lambda native=native: native)
        assert reproduce.machine_precision(cifar, "auto")["precision"] == expected
    assert reproduce.machine_precision(reproduce.settings("cpu-small", "cifar10"), "cpu") == \
        reproduce.settings("cpu-small", "cifar10")  # a float32 scale stays as it is
    store = reproduce.RESULTS / "cpu"
    store.mkdir(parents=True)
    row = _result("cifar10", "badnets", "aabl", **{**cifar, "train_images": 20000, "precision": "fp32"})
    assert reproduce.is_current(row, "cpu")  # the same recipe: only the arithmetic differs
    (store / "cifar10-badnets-aabl.json").write_text(json.dumps(row))
    text = reproduce.render("cpu")
    assert "Ran in float32, on a CPU without bf16 instructions" in text and "cifar10/badnets/aabl." in text
    assert "no longer gives" not in text


def test_the_data_is_unzipped_whole_or_not_at_all(reproduce, tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("top/train/a/0.png", b"x")
        z.writestr("top/test/a/0.png", b"y")
    raw = tmp_path / "raw"

    def interrupted(self, path):
        (Path(path) / "top" / "train").mkdir(parents=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extractall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            reproduce.unzip_once(archive, raw, "top")
    assert not (raw / "top").exists()  # the half-extracted folder is not where the data goes
    assert reproduce.unzip_once(archive, raw, "top") == raw / "top"
    assert (raw / "top" / "test" / "a" / "0.png").read_bytes() == b"y"
    assert sorted(p.name for p in raw.iterdir()) == ["top"]  # the leftover is gone
