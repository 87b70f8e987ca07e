"""output_dir/report.html: one static page (images referenced relatively, the loss curve as inline SVG) with
the resolved config, data thumbnails, loss curve, validation sweep, timings and peak memory. No server needed.

Regenerate for a finished run with `python -m dreambooth.report.page OUTPUT_DIR`.
"""

from __future__ import annotations

import html
import logging
import sys
from pathlib import Path
from urllib.parse import quote

import yaml

from dreambooth.data.annotations import read_caption
from dreambooth.data.dataset import CAPTION_SUFFIX, list_images, load_image
from dreambooth.data.subjects import class_folder, prompts_as_trained
from dreambooth.files import read_json, write_text_atomic
from dreambooth.report.scores import score_charts, scores_table
from dreambooth.training.runlog import hms

log = logging.getLogger(__name__)

REPORT = "report.html"
ASSETS = "report_files"  # thumbnails of the training data, written beside the page
THUMB = 128
MAX_THUMBS = 12


def smooth(values: list[float], span: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style); span ~ len/20 when not given."""
    span = span or max(1.0, len(values) / 20)
    alpha, avg, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


# ----------------------------------------------------------------------------------------------- loss curve

def loss_svg(history: list[dict], marks: list[int] = (), width: int = 720, height: int = 260) -> str:
    """Instance and prior loss against step, raw (faint) and smoothed, with dashed lines at `marks`."""
    instance_key = "instance_loss" if any("instance_loss" in h for h in history) else "loss"
    series = [(name, key, color) for name, key, color in
              (("instance loss", instance_key, "#1f6fb4"), ("prior loss", "prior_loss", "#d0661c"))
              if any(key in h for h in history)]
    points = {key: [(h["step"], h[key]) for h in history if key in h and h[key] == h[key]] for _, key, _ in series}
    values = [v for pts in points.values() for _, v in pts]
    if not values:
        return "<p>No loss history was recorded.</p>"
    steps = [h["step"] for h in history]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    # Clip the y range at the 98th percentile: one early spike would otherwise flatten the whole curve.
    ordered = sorted(values)
    y0, y1 = 0.0, ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))] * 1.05 or 1.0
    left, right, top, bottom = 52, 12, 12, 30
    pw, ph = width - left - right, height - top - bottom

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * pw, top + ph - (min(value, y1) - y0) / (y1 - y0) * ph)

    def path(pts):
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in pts))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="loss curve" font-family="sans-serif" font-size="11">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, v)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for i in range(6):
        s = round(x0 + (x1 - x0) * i / 5)
        x, _ = xy(s, y0)
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">{s}</text>')
    for m in marks:
        if x0 <= m <= x1:
            x, _ = xy(m, y0)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#999" '
                         f'stroke-dasharray="3,3"><title>validation at step {m}</title></line>')
    for i, (name, key, color) in enumerate(series):
        pts = points[key]
        smoothed = list(zip([s for s, _ in pts], smooth([v for _, v in pts])))
        parts.append(f'<polyline points="{path(pts)}" fill="none" stroke="{color}" stroke-opacity="0.25"/>')
        parts.append(f'<polyline points="{path(smoothed)}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + 8}" y="{top + 16 + 14 * i}" fill="{color}">{name} (smoothed)</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- sections

def _src(rel: str) -> str:
    return html.escape(quote(rel))


def _subjects(config: dict) -> list[dict]:
    return config.get("subjects") or [config.get("data") or {}]


def _prompts(subject: dict) -> tuple:
    """A config subject's (instance, class) prompts as trained (reads its dataset_info.json)."""
    return prompts_as_trained(subject.get("dir"), subject.get("instance_prompt"), subject.get("class_prompt"))


def _caption(path: Path, instance_prompt) -> str:
    """The NAME.txt caption beside an instance image (captions: true) as trained, for its thumbnail; "" if none."""
    return read_caption(path.with_suffix(CAPTION_SUFFIX), str(instance_prompt), []) or ""


def _thumbnails(out: Path, subjects: list[tuple[dict, tuple]], captions: bool = False, masks: bool = False) -> str:
    """Small PNG copies of the training (and class) images in report_files/, so the page survives a move.
    SUBJECTS: each config subject with its prompts as trained (_prompts); CAPTIONS: show each image's caption;
    MASKS: mask files are expected beside the images."""
    assets = out / ASSETS
    assets.mkdir(exist_ok=True)
    blocks = []
    for i, (subject, (instance, cls)) in enumerate(subjects):
        folder = Path(subject.get("dir") or "")
        blocks.append(f"<p>Subject {i + 1}: instance prompt <b>{html.escape(str(instance))}</b>, "
                      f"class prompt <b>{html.escape(str(cls))}</b></p>")
        class_dir = class_folder(subject.get("dir") or "", subject.get("class_data_dir"))
        for label, where, n in (("instance images", folder, MAX_THUMBS), ("class images", class_dir, 8)):
            if not where.is_dir():
                continue
            try:
                paths = list_images(where, captions=captions, masks=masks)
            except Exception as e:  # an unreadable folder must not cost the whole report
                log.warning("report: cannot list %s: %s", where, e)
                continue
            cells = []
            for j, path in enumerate(paths[:n]):
                try:
                    image = load_image(path)
                except Exception:
                    continue
                image.thumbnail((THUMB, THUMB))
                name = f"{ASSETS}/s{i}-{'class' if label.startswith('class') else 'data'}-{j:02d}.png"
                image.save(out / name)
                text = _caption(path, instance) if captions and where == folder else ""
                text = f"<br><i>{html.escape(text)}</i>" if text else ""
                cells.append(f'<figure><img src="{_src(name)}" alt="{html.escape(path.name)}">'
                             f'<figcaption>{html.escape(path.name)}{text}</figcaption></figure>')
            if cells:
                more = f" (first {n} of {len(paths)})" if len(paths) > n else ""
                blocks.append(f"<h3>{html.escape(label)}: {html.escape(str(where))}{more}</h3>"
                              f'<div class="thumbs">{"".join(cells)}</div>')
    if not any("thumbs" in b for b in blocks):
        blocks.append("<p>The training images were not found (the data folder moved?).</p>")
    return "".join(blocks)


def _fmt(key: str, value) -> str:
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return f"{value / 2**30:.2f} GiB"
    if key.endswith("_s") and isinstance(value, (int, float)) and key != "samples_per_s":
        return f"{value:.1f} s ({hms(value)})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_table(summary: dict, validation: dict) -> str:
    rows = []

    def add(prefix: str, d: dict):
        for k, v in d.items():
            if isinstance(v, dict):
                add(f"{prefix}{k}.", v)
            elif not isinstance(v, list):
                rows.append(f"<tr><th>{html.escape(prefix + k)}</th><td>{html.escape(_fmt(k, v))}</td></tr>")
    add("", {k: v for k, v in summary.items() if k != "validation_scores"})  # shown with the sweep instead
    spent = sum(d.get("seconds", 0) for d in validation.get("done", {}).values())
    if spent:
        rows.append(f"<tr><th>validation time (part of wall time)</th><td>{_fmt('x_s', spent)}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else "<p>No training summary was written.</p>"


def _validation(validation: dict) -> str:
    if not validation.get("done"):
        return "<p>No validation images (validation.enabled was off, or no scheduled step was reached).</p>"
    prompts = "".join(f"<li>{html.escape(p)}</li>" for p in validation.get("prompts", []))
    settings = ", ".join(f"{k} {validation.get(k)}" for k in ("seeds", "num_inference_steps", "guidance_scale",
                                                              "negative_prompt", "scheduler"))
    grids = "".join(f'<li><a href="{_src(d["grid"])}">step {s}</a></li>'
                    for s, d in sorted(validation["done"].items(), key=lambda kv: int(kv[0])))
    return (f'<p>Rows are prompts, columns are steps. Pick the step where the subject is right and the prompt '
            f'still changes the scene (later steps often copy the training photos).</p>'
            f'<div class=beside><img class="grid" src="{_src(validation["sweep"])}" alt="validation sweep">'
            f'{score_charts(validation)}</div>{scores_table(validation)}'
            f"<p>Prompts:</p><ol>{prompts}</ol><p class=small>{html.escape(settings)}</p>"
            f"<details><summary>Grid of every seed per step</summary><ul>{grids}</ul></details>")


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse}th,td{text-align:left;padding:2px 10px;border-bottom:1px solid #eee;font-size:.9em}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em;max-height:30em}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:.75em;text-align:center;width:128px}
figure img{max-width:128px;max-height:128px;min-width:64px;image-rendering:pixelated}
img.grid{max-width:100%;min-width:320px;image-rendering:pixelated;border:1px solid #ddd}
.small{font-size:.85em;color:#555}#missing{color:#b00;font-weight:bold}
.beside{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.beside img.grid{flex:0 1 auto}
.metrics{display:flex;flex-wrap:wrap;gap:10px;flex:1 1 300px}tr.best td{background:#fff3c4;font-weight:bold}"""

# Marks the page when an image did not load, visibly for the user and as data-broken-images for tests.
CHECK = """<script>window.addEventListener("load",function(){var bad=Array.prototype.filter.call(document.images,
function(i){return !(i.complete&&i.naturalWidth>0)});document.body.setAttribute("data-broken-images",bad.length);
if(bad.length){var m=document.getElementById("missing");m.hidden=false;m.textContent=bad.length+
" image(s) did not load: keep report.html inside its output folder."}});</script>"""


def write_report(out_dir: str | Path) -> Path:
    """Write output_dir/report.html from the files a run leaves there; returns its path."""
    out = Path(out_dir)
    config_text = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) or {}
    summary = read_json(out / "train_summary.json", {})
    history = read_json(out / "loss_history.json", [])
    validation = read_json(out / "validation" / "index.json", {})
    marks = sorted(int(s) for s in validation.get("done", {}))
    subjects = [(s, _prompts(s)) for s in _subjects(config)]  # each dataset_info.json read once
    prompts = ", ".join(dict.fromkeys(str(p) for _, (p, _cls) in subjects if p))
    head = (f"model {config.get('model', '?')} &middot; {summary.get('steps', '?')} steps &middot; "
            f"learning rate {config.get('learning_rate', '?')} &middot; final loss "
            f"{_fmt('loss', summary.get('final_loss', '?'))}")
    if (validation.get("recommended") or {}).get("step") is not None:
        head += f" &middot; recommended step <b>{validation['recommended']['step']}</b>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DreamBooth run: {html.escape(out.name)}</title>
<style>{STYLE}</style></head>
<body data-broken-images="unknown">
<h1>DreamBooth run: {html.escape(out.name)}</h1>
<p id="missing" hidden></p>
<p>{head}</p>{f"<p>Prompts: {html.escape(prompts)}</p>" if prompts else ""}
<h2>Validation sweep</h2>
{_validation(validation)}
<h2>Loss</h2>
{loss_svg(history, marks)}
<p class=small>Loss against training step. Faint lines: per-step loss; solid: smoothed. Dashed: validation steps.</p>
<h2>Timings and memory</h2>
{_summary_table(summary, validation)}
<h2>Training data</h2>
{_thumbnails(out, subjects, bool(config.get("captions")), bool(config.get("masked_loss")))}
<h2>Resolved config</h2>
<pre>{html.escape(config_text)}</pre>
{CHECK}
</body></html>
"""
    return write_text_atomic(out / REPORT, page)


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "output"))
