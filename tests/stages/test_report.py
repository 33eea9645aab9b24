"""report: one self-contained HTML page from a work directory, its gallery and saliency, bad input,
and a render in headless Chromium where one is installed."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_folder, write_fake_scan
from PIL import Image
from torch import nn

from aabl_cli.cli import cli
from aabl_cli.stages.report import choose_gallery, gradient_saliency, overlay_pair
from aabl_cli.stages.report.html import TITLES

# The file name a crafted dataset could use to inject markup into the page.
ODD_NAME = "a<img src=x onerror=alert(1)>&.png"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes | None]:
    """Every folder and file below `roots` (names and bytes), so a test can see that nothing changed."""
    seen: dict[str, bytes | None] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.name in skip:
                continue
            seen[f"{root}:{path.relative_to(root).as_posix()}"] = path.read_bytes() if path.is_file() else None
    return seen


def split_rows(workdir: Path) -> list[dict[str, str]]:
    with open(workdir / "split" / "split.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', page)


def expected_gallery(workdir: Path, per_class: int) -> int:
    isolated: dict[str, int] = {}
    for row in split_rows(workdir):
        if row["kept"] == "0":
            isolated[row["label"]] = isolated.get(row["label"], 0) + 1
    return sum(min(per_class, n) for n in isolated.values())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny BadNets-poisoned folder (its root's name holds a `<`) through poison, scan, split, train and
    report, with snapshots of the inputs taken before the report."""
    base = tmp_path_factory.mktemp("report")
    clean = make_folder(base / "clean", classes=3, per_class=12, size=16, seed=3)
    data, work, cache = base / "data<x>", base / "work", base / "cache"
    steps = {
        "poison": invoke("poison", clean, "--backdoor", "badnets", "--out", data, "--rate", "0.15", "--quiet"),
        "scan": invoke("scan", data, "--arch", "cnn", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                       "--cache-dir", cache, "--workdir", work, "--quiet"),
        # quantile, not Otsu: training needs two non-empty classes in kept/ whatever one epoch learnt
        "split": invoke("split", "--workdir", work, "--method", "quantile", "--fraction", "0.3", "--quiet"),
        "train": invoke("train", "--arch", "cnn", "--epochs", "2", "--steps", "1", "--batch-size", "8", "--device",
                        "cpu", "--cache-dir", cache, "--workdir", work, "--quiet"),
    }
    for name, result in steps.items():
        assert result.exit_code == 0, f"{name}: {result.output}"
    before = snapshot(data, work)
    result = invoke("report", work, "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return {"base": base, "data": data, "work": work, "before": before, "result": result,
            "summary": json.loads(result.stdout), "page": (work / "report.html").read_text(encoding="utf-8")}


@pytest.fixture
def fake(tmp_path):
    """A scored work directory without any training: chosen scores (the odd file name lowest), a split, and an
    untrained scan model, so the gallery is known in advance. No train/."""
    clean = make_folder(tmp_path / "clean", classes=3, per_class=6, size=16)
    Image.open(clean / "class_1" / "img_000.png").save(clean / "class_1" / ODD_NAME)
    data = tmp_path / "data"
    assert invoke("poison", clean, "--backdoor", "badnets", "--out", data, "--rate", "0.2", "--quiet").exit_code == 0
    from aabl_cli.core.data import list_image_folder

    listing = list_image_folder(data)
    paths = [rel for rel, _ in listing.files]
    scores = [0.01 if rel.endswith(ODD_NAME) else 0.1 + i for i, rel in enumerate(paths)]
    work = tmp_path / "work"
    write_fake_scan(work, data, scores)
    scan = json.loads((work / "scan" / "scan.json").read_text())
    scan["acc"] = 0.3  # an untrained model: the split warns, and so must the page
    (work / "scan" / "scan.json").write_text(json.dumps(scan))
    from aabl_cli.core.checkpoint import save_model
    from aabl_cli.core.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=(16, 16), mean=[0.5] * 3, std=[0.25] * 3)
    save_model(work / "scan" / "model.safetensors", model, arch="cnn", classes=listing.classes, image_size=(16, 16),
               stage="scan", eps=0.0, epochs=0, seed=0, dataset_fingerprint=scan["dataset_fingerprint"])
    assert invoke("split", "--workdir", work, "--method", "quantile", "--fraction", "0.5", "--quiet").exit_code == 0
    return {"data": data, "work": work}


# ---------------------------------------------------------------- the page


def test_report_is_one_self_contained_page(run):
    page = run["page"]
    assert page.startswith("<!DOCTYPE html>")
    assert 'src="http' not in page and "<link" not in page and "<script" not in page.lower()
    assert "url(" not in page and "@import" not in page
    sources = img_sources(page)
    assert len(sources) == page.count("<img")
    assert len(sources) >= 3 + run["summary"]["gallery"]["images"]  # histogram, classes, curves, gallery
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
    for key in ("summary", "scores", "classes", "training", "settings", "ground-truth", "gallery"):
        assert f"<h2>{TITLES[key]}</h2>" in page, key
    assert run["summary"]["sections"] == ["summary", "scores", "classes", "training", "settings", "ground-truth",
                                          "gallery"]
    assert "data&lt;x&gt;" in page and "data<x>" not in page  # the dataset root, escaped


def test_report_summary_names_the_split(run):
    page, split = run["page"], json.loads((run["work"] / "split" / "split.json").read_text())
    assert split["verdict"] in page and split["suspected_class"] in page
    assert split["dataset_fingerprint"][:12] in page
    for key in ("rho_vul", "precision / recall"):
        assert f"<th>{key}</th>" in page
    summary = run["summary"]
    assert summary["report"] == str(run["work"] / "report.html") and summary["training"] is True
    assert summary["samples"] == split["samples"] and summary["isolated"] == split["isolated"]


def test_gallery_shows_the_most_robust_isolated_images_per_class(run, tmp_path):
    assert run["summary"]["gallery"]["images"] == expected_gallery(run["work"], 8)
    assert run["page"].count('<figure class="sample">') == expected_gallery(run["work"], 8)
    out = tmp_path / "two.html"
    result = invoke("report", run["work"], "--per-class", "2", "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert page.count('<figure class="sample">') == expected_gallery(run["work"], 2)
    rows = [r for r in split_rows(run["work"]) if r["kept"] == "0"]
    for label in {r["label"] for r in rows}:
        lowest = sorted((r for r in rows if r["label"] == label), key=lambda r: float(r["score"]))[0]
        assert f'<span class="path">{lowest["path"]}</span>' in page


def test_confusion_counts_match_split_json(run):
    split = json.loads((run["work"] / "split" / "split.json").read_text())
    truth = split["ground_truth"]
    iso_poison = round(truth["precision"] * split["isolated"])
    kept_poison = round(truth["rho_vul"] * split["kept"])
    assert iso_poison + kept_poison == truth["poisoned"]
    expected = {"kept_poison": kept_poison, "kept_clean": split["kept"] - kept_poison,
                "isolated_poison": iso_poison, "isolated_clean": split["isolated"] - iso_poison}
    assert run["summary"]["confusion"] == expected
    table = re.search(r'<table class="confusion">(.*?)</table>', run["page"]).group(1)
    cells = {name: [int(v) for v in re.findall(r'<td class="num">(\d+)</td>', row)]
             for name, row in re.findall(r"<tr><th>(\w+)</th>(.*?)</tr>", table)}
    assert cells["kept"] == [kept_poison, split["kept"] - kept_poison, split["kept"]]
    assert cells["isolated"] == [iso_poison, split["isolated"] - iso_poison, split["isolated"]]


def test_report_leaves_the_work_directory_and_dataset_alone(run):
    after = snapshot(run["data"], run["work"], skip=("report.html",))
    assert after == run["before"]
    assert not [p for p in run["work"].iterdir() if p.name.startswith(".")]  # no temporary file left


def test_file_names_are_escaped_and_a_missing_training_is_said(fake):
    before = snapshot(fake["data"], fake["work"])
    result = invoke("report", fake["work"], "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    page = (fake["work"] / "report.html").read_text(encoding="utf-8")
    assert ODD_NAME not in page and "<img src=x" not in page
    assert "a&lt;img src=x onerror=alert(1)&gt;&amp;.png" in page
    assert "Training has not run" in page and "ground-truth" in json.loads(result.stdout)["sections"]
    assert "warning: the naive model classifies only 30% of its own training images" in page
    for src in img_sources(page):
        assert src.startswith("data:image/png;base64,")
    assert snapshot(fake["data"], fake["work"], skip=("report.html",)) == before


# ---------------------------------------------------------------- bad input


def test_missing_outputs_exit_2_naming_the_command_to_run(tmp_path):
    result = invoke("report", tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.output and "aabl scan" in result.output
    (tmp_path / "w").mkdir()
    result = invoke("report", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert "aabl scan" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w" / "report.html").exists()


def test_missing_split_and_damaged_json_exit_2(fake):
    work = fake["work"]
    split_json = work / "split" / "split.json"
    saved = split_json.read_text()
    split_json.write_text(saved[: len(saved) // 2])
    result = invoke("report", work, "--device", "cpu")
    assert result.exit_code == 2 and "damaged" in result.output and "aabl split" in result.output
    split_json.write_text(json.dumps({**json.loads(saved), "per_class": [{"class": "class_0"}]}))
    result = invoke("report", work, "--device", "cpu")
    assert result.exit_code == 2 and "aabl split" in result.output and "Traceback" not in result.output
    split_json.unlink()
    result = invoke("report", work, "--device", "cpu")
    assert result.exit_code == 2 and "aabl split" in result.output and "Traceback" not in result.output
    assert not (work / "report.html").exists()


def test_out_inside_the_dataset_is_refused(fake):
    result = invoke("report", fake["work"], "--out", fake["data"] / "report.html", "--device", "cpu")
    assert result.exit_code == 2 and "inside" in result.output
    assert not (fake["data"] / "report.html").exists()


# ---------------------------------------------------------------- gallery choice and saliency


def test_gallery_choice_puts_the_suspect_first_and_caps_the_total():
    labels = np.repeat(np.arange(100), 10)
    scores = np.random.default_rng(0).random(1000)
    chosen = choose_gallery(labels, scores, np.ones(1000, dtype=bool), num_classes=100, per_class=8, first=7, cap=256)
    assert chosen[0][0] == 7 and len(chosen) == 100
    assert all(len(idx) == 2 for _, idx in chosen)  # 256 // 100 each
    label, idx = chosen[0]
    assert list(scores[idx]) == sorted(scores[labels == label])[:2]
    isolated = labels < 3
    chosen = choose_gallery(labels, scores, isolated, num_classes=100, per_class=8)
    assert [c for c, _ in chosen] == [0, 1, 2] and all(len(i) == 8 for _, i in chosen)


class CornerModel(nn.Module):
    """Logits from a 3x3 patch in the bottom-right corner only: a trigger the model depends on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(27, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, :, -3:, -3:].flatten(1))


def test_saliency_peaks_on_the_trigger():
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    maps = gradient_saliency(CornerModel().eval(), x, y)
    assert maps.shape == (6, 16, 16)
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(6))
    for m in maps:
        row, col = divmod(int(m.argmax()), 16)
        assert row >= 13 and col >= 13
        assert float(m[:13].max()) == 0.0 and float(m[:, :13].max()) == 0.0


def test_overlay_enlarges_with_whole_pixels():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[-3:, -3:] = 255
    saliency = np.zeros((16, 16), dtype=np.float32)
    saliency[-3:, -3:] = 1.0
    pair = overlay_pair(image, saliency)
    assert pair.shape == (96, 96 * 2 + 4, 3)
    assert (pair[:, :96] == image.repeat(6, 0).repeat(6, 1)).all()
    heat = pair[:, 100:].astype(int).sum(axis=2)
    assert heat[-18:, -18:].min() > heat[:78, :78].max()  # the hot spot is the brightest part


# ---------------------------------------------------------------- in a browser

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser")) if path), None)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(profile)})


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH")
def test_page_renders_in_headless_chromium(run, tmp_path):
    page = run["work"] / "report.html"
    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.shape == (4000, 1280) and pixels.std() > 10  # not a blank page
    # A copy with a probe that counts the decoded images; the page's own policy forbids scripts.
    html = page.read_text(encoding="utf-8")
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    probe = ('<script>window.addEventListener("load", () => { const all = [...document.images]; '
             'document.body.setAttribute("data-images", all.length + "/" + '
             'all.filter(i => i.complete && i.naturalWidth > 0).length); });</script>')
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", probe + "</body>"), encoding="utf-8")
    result = _chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    n = html.count("<img")
    assert f'data-images="{n}/{n}"' in result.stdout
    for key in TITLES:
        assert f'<section id="{key}">' in result.stdout


def test_report_reads_a_work_directory_of_an_earlier_version(fake, tmp_path):
    """scan.json and split.json written before the renames (dataset_root, clean_acc, gamma,
    isolated_fraction, seconds as a number) give the same page."""
    work = fake["work"]
    assert invoke("report", work, "--device", "cpu", "--out", tmp_path / "now.html", "--quiet").exit_code == 0
    scan = json.loads((work / "scan" / "scan.json").read_text())
    scan["dataset_root"], scan["clean_acc"] = scan.pop("data"), scan.pop("acc")
    (work / "scan" / "scan.json").write_text(json.dumps(scan))
    split = json.loads((work / "split" / "split.json").read_text())
    split["dataset_root"], split["gamma"] = split.pop("data"), split.pop("kept_share")
    split["isolated_fraction"], split["seconds"] = split.pop("isolated_share"), split["seconds"]["total"]
    for row in split["per_class"]:
        row["isolated_fraction"] = row.pop("isolated_share")
    (work / "split" / "split.json").write_text(json.dumps(split))
    result = invoke("report", work, "--device", "cpu", "--out", tmp_path / "then.html", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "then.html").read_text() == (tmp_path / "now.html").read_text()
