"""The HTML of `aabl report`: one template, every user-derived string escaped, images inlined.

Nothing on the page is fetched: figures are base64 PNG data URIs, the style sheet is inline,
there is no script, and a Content-Security-Policy forbids loading anything but data: images.
"""

from __future__ import annotations

import base64
import html
import math
import string
from typing import TYPE_CHECKING, Any

from aabl_cli import __version__
from aabl_cli.core.text import in_255ths

if TYPE_CHECKING:
    from aabl_cli.stages.report.inputs import Inputs

TITLES = {"summary": "Summary", "scores": "Scores", "classes": "Isolated share per class", "training": "Training",
          "settings": "Settings", "ground-truth": "Split against the ground truth",
          "gallery": "Most suspicious isolated images"}
TABLE_IN_DETAILS = 40  # classes: a longer per-class table is folded away

PAGE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1120px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin: 1.4em 0 0.5em; font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.suspect td { background: #fdecea; font-weight: 600; }
.kv th { width: 15em; }
.settings { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1.5em;
            align-items: start; }
.settings table { width: 100%; font-size: 0.85em; }
.settings td { word-break: break-all; }
img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.badge { display: inline-block; padding: 0.05em 0.55em; border-radius: 0.8em; font-weight: 600; font-size: 0.9em; }
.bad { background: #c44e52; color: #fff; } .good { background: #55a868; color: #fff; }
.poison { background: #c44e52; color: #fff; } .clean { background: #dde3ea; color: #333; }
.note { color: #555; font-style: italic; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 14px; }
figure.sample { margin: 0; padding: 6px; border: 1px solid #e3e3e3; border-radius: 6px; background: #fcfcfc; }
figure.sample img { image-rendering: pixelated; display: block; max-width: 100%; height: auto; }
figure.sample figcaption { font-size: 0.8em; margin-top: 4px; line-height: 1.35; }
figure.sample .path { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
</style>
</head>
<body>
<main>
<h1>aabl report</h1>
<p class="note">$subtitle</p>
$sections
</main>
</body>
</html>
""")


def esc(value: Any) -> str:
    """Every string that comes from the user's data (paths, class names, settings) goes through here."""
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{data_uri(png)}" alt="{esc(alt)}">'


def _pct(x: Any) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return esc(x)
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _kv_table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _flatten(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _setting(key: str, value: Any) -> str:
    if value is None:
        return '<span class="note">none</span>'
    if isinstance(value, list):
        return esc(", ".join(str(v) for v in value))
    if key.endswith(("eps", "step_size")) and isinstance(value, float) and 0 < value <= 1:
        n255 = in_255ths(value)  # budgets read best as the x/255 the command line takes
        if n255 is not None:
            return f"{value:.4g} ({n255}/255)"
    return _num(value)


def _shared_patch(patch: dict | None, basis: str | None) -> str:
    """The split's shared-patch test, one clause per class tested (split.json's `shared_patch`)."""
    if not patch or not patch.get("tested"):
        return "not tested"
    parts = []
    for t in patch["tested"]:
        if t.get("ratio") is None:
            parts.append(f"class <b>{esc(t['class'])}</b>: not tested")
            continue
        flip = t.get("flip")
        painted = f", painted over: {_pct(flip)} leave the class" if flip is not None else ""
        parts.append(f"class <b>{esc(t['class'])}</b>: spread ratio {_num(t['ratio'])} at row {esc(t['at'][0])}, "
                     f"column {esc(t['at'][1])}{painted}")
    found = f" &mdash; the verdict's basis: {esc(basis)}" if basis else ""
    return "; ".join(parts) + (f" (a candidate at {_num(patch.get('threshold', 0.1))} or less, suspected when "
                               f"{_pct(patch.get('flip_threshold', 0.5))} or more leave)") + found


def _runner_up(test: dict | None) -> str:
    """The split's runner-up test of the suspected class (split.json's `runner_up`)."""
    if not test:
        return "not tested"
    if test.get("agreement") is None:
        return f"not tested ({esc(test.get('skipped', 'no reason given'))})"
    reading = ("one neighbour for most: a class robust by nature, the concentration set aside" if test["refuted"]
               else "spread, as other classes' images relabelled would be")
    typical = (f", {_pct(test['reference_agreement'])} of its {esc(test['reference_images'])} typical ones to "
               f"{esc(test['reference_runner_up'])}") if test.get("reference_agreement") is not None else ""
    return (f"{_pct(test['agreement'])} of class <b>{esc(test['class'])}</b>'s {esc(test['images'])} core images "
            f"go second to <b>{esc(test['runner_up'])}</b>{typical} (poisons from every class: about "
            f"{_pct(test['expected'])}; set aside above {_pct(test['threshold'])} and above the typical images' "
            f"share): {reading}")


def _summary(inputs: Inputs) -> str:
    scan, split = inputs.scan, inputs.split
    verdict = str(split["verdict"])
    badge = "bad" if verdict == "backdoor suspected" else "good"
    fingerprint = str(scan["dataset_fingerprint"])
    warnings = "".join(f'<br><span class="note">warning: {esc(w)}</span>' for w in split.get("warnings", []))
    rows = [("dataset", f"<code>{esc(scan['data'])}</code>"),
            ("images", f"{int(split['samples'])} in {len(scan['classes'])} classes"),
            ("fingerprint", f'<code title="{esc(fingerprint)}">{esc(fingerprint[:12])}</code>'),
            ("verdict", f'<span class="badge {badge}">{esc(verdict)}</span>' + warnings),
            ("suspected target class", f"<b>{esc(split.get('suspected_class', 'n/a'))}</b> (concentration "
                                       f"{_num(split.get('concentration', float('nan')))}, at least "
                                       f"{_num(split.get('concentration_low', float('nan')))} with "
                                       f"{_pct(split.get('concentration_confidence', 0.95))} confidence, in the core "
                                       f"of the {esc(split.get('core_size', '?'))} most robust isolated images; "
                                       f"suspected when that bound is "
                                       f"{_num(split.get('concentration_threshold', 0.5))} or more)"),
            ("runner-up test", _runner_up(split.get("runner_up"))),
            ("shared patch", _shared_patch(split.get("shared_patch"), split.get("verdict_basis"))),
            ("threshold", f"{_num(float(split['threshold']))} ({esc(split['settings'].get('method', '?'))})"),
            ("kept", f"{int(split['kept'])} (gamma {_pct(split['kept_share'])})"),
            ("isolated", f"{int(split['isolated'])} ({_pct(split.get('isolated_share'))})")]
    truth = split.get("ground_truth")
    if truth:
        rows += [("ground truth", f"{esc(truth.get('poisoned'))} poisoned images (rho {_pct(truth.get('rho'))})"),
                 ("rho_vul", f"{_pct(truth.get('rho_vul'))} poison left in the kept set"),
                 ("precision / recall", f"{_pct(truth.get('precision'))} / {_pct(truth.get('recall'))} of the "
                                        "isolated set")]
    else:
        rows.append(("ground truth", '<span class="note">none (no poison.csv beside the dataset)</span>'))
    if "acc" in scan:
        rows.append(("naive model (scan)", f"accuracy {_pct(scan.get('acc'))}, under iFGSM "
                                           f"{_pct(scan.get('ra'))} on the training set"))
    if inputs.train is not None:
        final = inputs.train.get("final", {})
        extra = "".join(f", {name} {_pct(final[key])}" for key, name in (("val_acc", "validation"),
                                                                          ("val_ra", "validation under PGD"))
                        if key in final)
        rows.append(("robust model (train)", f"training accuracy {_pct(final.get('train_acc'))}{extra}"))
    skipped = split.get("skipped") or []
    if skipped:
        rows.append(("skipped files", f"{len(skipped)} unreadable (listed in split.json)"))
    for gate in split.get("gates") or []:
        rows.append(("gate tripped", esc(gate)))
    return _kv_table(rows)


def _scores(inputs: Inputs, png: bytes) -> str:
    truth = " The red outline marks the ground-truth poison." if inputs.table.poisoned is not None else ""
    return (_img(png, "score histogram") + '<p>Each image\'s score is the symmetric cross-entropy of its iFGSM '
            "example against its label. <b>Lower = more robust = more suspicious</b>: a patch trigger holds the "
            "label in place under the tiny attack, clean images flip. Images left of the dashed threshold were "
            f"isolated.{truth}</p>")


def _classes(inputs: Inputs, png: bytes, left_out: int) -> str:
    split = inputs.split
    suspected = split.get("suspected_class") if split["verdict"] == "backdoor suspected" else None
    head = ("<tr><th>class</th><th>images</th><th>isolated</th><th>of the class</th><th>share of data</th>"
            "<th>share of isolated</th><th>share of core</th></tr>")
    body = "".join(
        f'<tr{" class=suspect" if r.get("class") == suspected else ""}><td>{esc(r.get("class"))}</td>'
        f'<td class="num">{esc(r.get("samples"))}</td><td class="num">{esc(r.get("isolated"))}</td>'
        f'<td class="num">{_pct(r.get("isolated_share"))}</td><td class="num">{_pct(r.get("share_of_data"))}</td>'
        f'<td class="num">{_pct(r.get("share_of_isolated"))}</td><td class="num">{_pct(r.get("share_of_core"))}</td>'
        "</tr>" for r in split["per_class"])
    table = f"<table>{head}{body}</table>"
    if len(split["per_class"]) > TABLE_IN_DETAILS:
        table = f"<details><summary>all {len(split['per_class'])} classes</summary>{table}</details>"
    note = f" {left_out} classes with the smallest isolated shares are left out of the chart." if left_out else ""
    return (_img(png, "isolated share per class") + "<p>A backdoor's poisons share one label, so its target class "
            "takes a far larger share of the isolated set, and above all of its most robust core, than of the data. "
            f"Naturally robust classes raise their isolated share too, on clean data as well.{note}</p>" + table)


def _training(inputs: Inputs, png: bytes | None) -> str:
    if inputs.train is None:
        return (f'<p class="note">Training has not run: <code>aabl train --workdir {esc(inputs.workdir)}</code> '
                "trains the robust model on split/kept/.</p>")
    if png is None:
        return '<p class="note">train/history.csv is missing or empty, so there are no curves.</p>'
    return _img(png, "training curves") + "<p>Loss and accuracy per epoch from train/history.csv.</p>"


def _settings(inputs: Inputs) -> str:
    parts = []
    stages = [("scan", inputs.scan.get("settings", {})), ("split", inputs.split.get("settings", {}))]
    if inputs.train is not None:
        stages.append(("train", inputs.train.get("settings", {})))
    for name, settings in stages:
        rows = [(k, _setting(k, v)) for k, v in _flatten(settings if isinstance(settings, dict) else {})]
        parts.append(f"<div><h3>{name}</h3>{_kv_table(rows, 'settings-table')}</div>")
    return f'<div class="settings">{"".join(parts)}</div>'


def _ground_truth(counts: dict[str, int]) -> str:
    poison, clean = counts["kept_poison"] + counts["isolated_poison"], counts["kept_clean"] + counts["isolated_clean"]
    rows = [("kept", counts["kept_poison"], counts["kept_clean"]),
            ("isolated", counts["isolated_poison"], counts["isolated_clean"]),
            ("all", poison, clean)]
    body = "".join(f'<tr><th>{name}</th><td class="num">{p}</td><td class="num">{c}</td>'
                   f'<td class="num">{p + c}</td></tr>' for name, p, c in rows)
    return ('<table class="confusion"><tr><th></th><th>poison</th><th>clean</th><th>all</th></tr>'
            f"{body}</table><p>From the <code>poisoned</code> column of split.csv (poison.csv beside the dataset). "
            "Poison in the kept set is what adversarial training still has to suppress.</p>")


def _gallery(gallery: dict[str, Any]) -> str:
    parts = [f"<p>Per class, up to {int(gallery['per_class'])} isolated images with the lowest scores (the most "
             "robust, so the most suspicious), each beside a gradient saliency map from the scan's model: "
             "|d loss / d pixel| against the image's label, from dark (no influence) to light yellow (the pixels the "
             "label depends on most). A patch trigger shows as a hot spot in the same place on every poison; on clean "
             "images the map follows the object.</p>"]
    if not gallery["groups"]:
        parts.append('<p class="note">No image was isolated.</p>')
    for group in gallery["groups"]:
        shown = len(group["items"])
        parts.append(f"<h3>{esc(group['class'])}: {group['isolated']} isolated, the {shown} most robust</h3>"
                     '<div class="gallery">')
        for item in group["items"]:
            truth = ""
            if item["poisoned"] is not None:
                kind = "poison" if item["poisoned"] else "clean"
                truth = f' <span class="badge {kind}">{kind}</span>'
            parts.append(f'<figure class="sample">{_img(item["png"], item["path"], "sample")}<figcaption>'
                         f'<span class="path">{esc(item["path"])}</span><br>label <b>{esc(group["class"])}</b>, '
                         f'score {item["score"]:.4g}{truth}</figcaption></figure>')
        parts.append("</div>")
    if gallery["classes_left_out"]:
        parts.append(f'<p class="note">{gallery["classes_left_out"]} more classes with isolated images are not '
                     "shown, to keep the page small.</p>")
    if gallery["missing"]:
        parts.append(f'<p class="note">{len(gallery["missing"])} chosen images could be read neither from '
                     f"split/isolated/ nor from the dataset, e.g. {esc(gallery['missing'][0])}.</p>")
    return "".join(parts)


def render(*, inputs: Inputs, confusion: dict[str, int] | None, gallery: dict[str, Any],
           figures: dict[str, bytes | None], classes_left_out: int) -> tuple[str, list[str]]:
    """The page and the ids of its sections, in order."""
    bodies = {"summary": _summary(inputs), "scores": _scores(inputs, figures["scores"] or b""),
              "classes": _classes(inputs, figures["classes"] or b"", classes_left_out),
              "training": _training(inputs, figures["history"]), "settings": _settings(inputs)}
    if confusion is not None:
        bodies["ground-truth"] = _ground_truth(confusion)
    bodies["gallery"] = _gallery(gallery)
    sections = "\n".join(f'<section id="{key}"><h2>{TITLES[key]}</h2>{body}</section>' for key, body in bodies.items())
    subtitle = (f"Work directory <code>{esc(inputs.workdir)}</code>; aabl {esc(__version__)}. Nothing on this page "
                "is loaded from elsewhere.")
    page = PAGE.substitute(title=esc(f"aabl report: {inputs.scan['data']}"), subtitle=subtitle,
                           sections=sections)
    return page, list(bodies)
