"""`aabl report`: one self-contained HTML page that shows what a split removed and why.

It reads a work directory (scan/, split/ and, when present, train/; `inputs.py`) and never
writes into it except the page itself. The gallery (`gallery.py`) shows the most suspicious
isolated images with saliency maps; `html.py` renders the page.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from aabl_cli.core.fsutil import Place, refuse_overlap, write_text
from aabl_cli.core.plots import plot_class_shares, plot_history, plot_scores
from aabl_cli.core.workdir import STAGES, Workdir
from aabl_cli.stages.report import html as report_html
from aabl_cli.stages.report.gallery import gallery_of
from aabl_cli.stages.report.inputs import SplitTable, read_inputs


def _figure(plot: Any, *args: Any, **kwargs: Any) -> tuple[bytes, Any]:
    buffer = io.BytesIO()
    result = plot(buffer, *args, **kwargs)
    return buffer.getvalue(), result


def confusion(table: SplitTable) -> dict[str, int] | None:
    """kept / isolated x poison / clean counts, when split.csv carries the ground truth."""
    if table.poisoned is None:
        return None
    p, k = table.poisoned, table.kept
    return {"kept_poison": int((k & p).sum()), "kept_clean": int((k & ~p).sum()),
            "isolated_poison": int((~k & p).sum()), "isolated_clean": int((~k & ~p).sum())}


def report(workdir: str | Path = "aabl-out", *, out: str | Path | None = None, per_class: int = 8,
           device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Write the HTML report of a work directory to `out` (default `workdir/report.html`); return a summary."""
    started = time.time()
    wd = Workdir(workdir)
    inputs = read_inputs(wd.root)
    out = Path(out) if out is not None else wd.report
    reads = [Place(Path(inputs.scan["data"]), "the scanned data folder")]
    reads += [Place(wd.stage(stage).path, f"the {stage} output") for stage in STAGES if wd.stage(stage).path.exists()]
    refuse_overlap(reads, replaces=[Place(out, "--out")], fix="write the report outside the dataset and the stage "
                                                                "folders (the default is WORKDIR/report.html)")
    table = inputs.table
    hist_png, _ = _figure(plot_scores, table.scores, threshold=float(inputs.split["threshold"]),
                          isolated=~table.kept, poisoned=table.poisoned)
    classes_png, left_out = _figure(plot_class_shares, inputs.split["per_class"],
                                    suspected=inputs.split.get("suspected_class"))
    history_png = _figure(plot_history, inputs.history)[0] if inputs.history else None
    gallery = gallery_of(inputs, per_class=per_class, device=device, quiet=quiet)
    counts = confusion(table)
    page, sections = report_html.render(inputs=inputs, confusion=counts, gallery=gallery, figures={
        "scores": hist_png, "classes": classes_png, "history": history_png}, classes_left_out=left_out)
    write_text(out, page)
    shown = sum(len(g["items"]) for g in gallery["groups"])
    summary = {"report": str(out), "bytes": len(page.encode("utf-8")), "sections": sections,
               "samples": int(len(table.paths)), "kept": int(table.kept.sum()), "isolated": int((~table.kept).sum()),
               "verdict": inputs.split["verdict"], "gallery": {"images": shown, "per_class": {
                   g["class"]: len(g["items"]) for g in gallery["groups"]}, "unreadable": len(gallery["missing"])},
               "confusion": counts, "training": inputs.train is not None,
               "seconds": {"total": time.time() - started}}
    return summary
