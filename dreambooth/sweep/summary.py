"""The sweep's summary: one row per trial (its settings, status, losses, time) in sweep.csv and sweep.json, the best
trial by the chosen metric, and sweep.html (the metric table and the trials' validation grids side by side)."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from dreambooth.eval.best import finite
from dreambooth.files import read_json, write_text_atomic
from dreambooth.files import write_json_atomic as write_json
from dreambooth.sweep.grid import Trial
from dreambooth.sweep.trial import LOSSES, METRICS, folder_metrics, trial_record

CSV, JSON, HTML = "sweep.csv", "sweep.json", "sweep.html"
COLUMNS = ("status", "steps", *METRICS, "wall_time_s", "train_time_s", "attempts", "error")


def trial_row(trial: Trial, reported: dict | None = None, earlier: dict | None = None) -> dict:
    """A trial's row: its folder's record and metrics; for a trial that did not finish, the last metrics it
    reported (`reported`, from this sweep's engine) or the row an earlier run of the sweep wrote (`earlier`)."""
    out = Path(trial.dir)
    record = trial_record(out)
    status = record.get("status") or (earlier or {}).get("status") or "not_started"
    row = {"trial": trial.name, **trial.settings, "status": status}
    before = reported or dict(earlier or {}, step=(earlier or {}).get("steps"))
    before = {k: v for k, v in before.items() if k in (*METRICS, "step") and v is not None}
    folder = folder_metrics(out)
    # A finished run's files are the truth; an unfinished one's files may predate what it reported last.
    metrics = {**before, **folder} if status == "finished" else {**folder, **before}
    row["steps"] = metrics.get("step")
    for key in METRICS:  # the losses always; scores where validation.metrics computed them
        if key in LOSSES or metrics.get(key) is not None:
            row[key] = metrics.get(key)
    row.update(wall_time_s=record.get("wall_time_s"), train_time_s=metrics.get("train_time_s"),
               attempts=record.get("attempts"), error=record.get("error"))
    return row


def best_trial(rows: list[dict], metric: str, mode: str = "min") -> str | None:
    """The finished trial with the lowest (mode min) or highest metric; None if no finished trial has it."""
    scored = [(r[metric], r["trial"]) for r in rows if r["status"] == "finished" and finite(r.get(metric))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored)[1]


def write_summary(sweep_dir: Path, trials: list[Trial], rows: list[dict], metric: str, mode: str,
                  command: str | None = None) -> str | None:
    """sweep.csv, sweep.json and sweep.html in the sweep folder; returns the best trial's name."""
    best = best_trial(rows, metric, mode)
    for row in rows:
        row["best"] = row["trial"] == best
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep_dir / CSV, table.getvalue())
    write_json(sweep_dir / JSON, {"metric": metric, "mode": mode, "best": best, "command": command, "trials": rows})
    write_text_atomic(sweep_dir / HTML, page(sweep_dir, trials, rows, metric, mode, best, command))
    return best


def earlier_rows(sweep_dir: Path) -> dict[str, dict]:
    """The rows an earlier run of this sweep wrote, by trial name."""
    return {r["trial"]: r for r in read_json(sweep_dir / JSON, {}).get("trials", []) if "trial" in r}


# ----------------------------------------------------------------------------------------------- sweep.html

def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _grids(trial: Trial) -> dict[int, str]:
    """{step: validation grid path relative to the trial folder} of the trial's validation images."""
    done = read_json(Path(trial.dir) / "validation" / "index.json", {}).get("done", {})
    return {int(step): d["grid"] for step, d in done.items() if isinstance(d, dict) and d.get("grid")}


def _table(rows: list[dict], metric: str, mode: str) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("best", "error")]
    arrow = " &#9660;" if mode == "min" else " &#9650;"  # the ranking column: lower or higher is better
    head = "".join(f"<th>{html.escape(k)}{arrow if k == metric else ''}</th>" for k in keys) + "<th></th>"
    body = ""
    for r in rows:
        name = html.escape(r["trial"])
        cells = "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
        links = (f'<a href="{name}/report.html">report</a> <a href="{name}/config.yaml">config</a>'
                 + (f' <span class=err title="{html.escape(r["error"])}">error</span>' if r.get("error") else ""))
        body += f'<tr{" class=best" if r.get("best") else ""}>{cells}<td>{links}</td></tr>\n'
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _validation(trials: list[Trial], best: str | None) -> str:
    grids = {t.name: _grids(t) for t in trials}
    steps = sorted({s for g in grids.values() for s in g})
    if not steps:
        return "<p>No validation images (validation.enabled was off in the trials, or none reached a step).</p>"
    head = "<th>trial</th>" + "".join(f"<th>step {s}</th>" for s in steps)
    body = ""
    for t in trials:
        cells = "".join(f'<td><a href="{html.escape(t.name)}/{g}"><img src="{html.escape(t.name)}/{g}" '
                        f'alt="{html.escape(t.name)} step {s}"></a></td>' if (g := grids[t.name].get(s)) else "<td></td>"
                        for s in steps)
        body += f'<tr{" class=best" if t.name == best else ""}><th>{html.escape(t.name)}</th>{cells}</tr>\n'
    return f"<table class=grids><tr>{head}</tr>\n{body}</table>"


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{border-bottom:1px solid #ddd}
table{border-collapse:collapse}th,td{text-align:left;padding:2px 8px;border-bottom:1px solid #eee;font-size:.9em}
tr.best{background:#e6f4e6;font-weight:bold}.grids img{max-width:360px;image-rendering:pixelated}
.err{color:#b00}.small{font-size:.85em;color:#555}"""


def page(sweep_dir: Path, trials: list[Trial], rows: list[dict], metric: str, mode: str, best: str | None,
         command: str | None) -> str:
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in dict.fromkeys(r["status"] for r in rows))
    pick = (f"Best trial by {html.escape(metric)} ({'lowest' if mode == 'min' else 'highest'}): "
            f"<b>{html.escape(best)}</b> (highlighted)" if best else f"No finished trial has {html.escape(metric)} yet.")
    again = f"<p class=small>Rerun (skips finished trials): <code>{html.escape(command)}</code></p>" if command else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DreamBooth sweep: {html.escape(sweep_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>DreamBooth sweep: {html.escape(sweep_dir.name)}</h1>
<p>{len(rows)} trials: {counts}. {pick}.</p>{again}
<h2>Trials</h2>
{_table(rows, metric, mode)}
<p class=small>Losses are the training loss (lower is better, a rough guide only: compare the images). final_loss: the
last step's; mean_loss: over all steps; recent_loss: mean of the last steps. validation_*: the scores of the last
scored validation step (docs/evaluate.md). Each trial's folder is a normal run: resume, export or generate from it
alone.</p>
<h2>Validation grids at the same steps</h2>
{_validation(trials, best)}
</body></html>
"""

