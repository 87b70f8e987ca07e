"""The report's scored-validation part: one small metric-vs-step chart per score (inline SVG), the recommended
step marked on each, and the table of scores."""

from __future__ import annotations

import html

from dreambooth.eval.best import finite

# Metric -> (title, colour, what a higher value means).
METRICS = {
    "dino": ("DINO", "#1f6fb4", "subject fidelity (higher: closer to the photos)"),
    "clip_i": ("CLIP-I", "#6a3d9a", "subject fidelity, CLIP embeddings"),
    "clip_t": ("CLIP-T", "#2a9d4b", "prompt fidelity (falls as the model copies the photos)"),
    "loss": ("instance loss", "#d0661c", "denoising loss on the subject's photos (falls as it is learned)"),
    "drift": ("class drift", "#b02a2a", "class-image loss above the base model's (prior preservation keeps it low)"),
}
RECOMMENDED = "#e0a000"


def metric_svg(points: list[tuple[int, float]], title: str, color: str, mark: int | None = None,
               reference: float | None = None, width: int = 260, height: int = 150) -> str:
    """One score against step: a line through the validated steps, the recommended step `mark` as a vertical
    band, `reference` (the real photos' own score) as a dashed line."""
    values = [v for _, v in points] + ([reference] if finite(reference) else [])
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 0.05
    y0, y1 = lo - pad, hi + pad
    steps = [s for s, _ in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    left, right, top, bottom = 46, 10, 20, 24
    pw, ph = width - left - right, height - top - bottom

    def xy(step, value):
        x = left + (step - x0) / (x1 - x0) * pw if len(steps) > 1 else left + pw / 2
        return x, top + ph - (value - y0) / (y1 - y0) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{html.escape(title)} by step" class="metric" '
             f'font-family="sans-serif" font-size="10">',
             f'<text x="{left}" y="13" font-size="12" font-weight="bold" fill="{color}">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for v in (y0 + pad, y1 - pad) if hi > lo else (lo,):
        _, y = xy(x0, v)
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{v:.3g}</text>')
    if mark is not None and x0 <= mark <= x1:
        x, _ = xy(mark, y0)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="{RECOMMENDED}" '
                     f'stroke-width="6" stroke-opacity="0.45" class="recommended">'
                     f'<title>recommended step {mark}</title></line>')
    if finite(reference):
        _, y = xy(x0, reference)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#777" '
                     f'stroke-dasharray="4,3"><title>real photos against each other: {reference:.3f}</title></line>')
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in points))
    parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
    for s, v in points:
        x, y = xy(s, v)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>step {s}: {v:.4f}</title>'
                     f'</circle>')
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{s}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scores(scoring: dict) -> dict[int, dict]:
    return {int(s): v for s, v in (scoring.get("scores") or {}).items()}


def score_charts(scoring: dict) -> str:
    """One chart per score in validation/index.json's scoring entries, the recommended step marked; "" if none."""
    scores = _scores(scoring)
    mark = (scoring.get("recommended") or {}).get("step")
    reference = scoring.get("reference") or {}
    charts = []
    for key, (title, color, _) in METRICS.items():
        points = sorted((s, v[key]) for s, v in scores.items() if finite(v.get(key)))
        if points:
            charts.append(metric_svg(points, title, color, mark, reference.get(key)))
    return f"<div class=metrics>{''.join(charts)}</div>" if charts else ""


def scores_table(scoring: dict) -> str:
    """The recommended step and the rule that picked it, what each score means, and the scores by step."""
    scores = _scores(scoring)
    if not scores:
        return ""
    best = scoring.get("recommended") or {}
    mark = best.get("step")
    shown = [k for k in METRICS if any(finite(v.get(k)) for v in scores.values())]
    head = "".join(f"<th>{html.escape(METRICS[k][0])}</th>" for k in shown)
    rows = "".join(
        f'<tr{" class=best" if s == mark else ""}><td>{s}{" (recommended)" if s == mark else ""}</td>'
        + "".join(f"<td>{scores[s][k]:.4f}</td>" if finite(scores[s].get(k)) else "<td>-</td>" for k in shown)
        + "</tr>" for s in sorted(scores))
    if mark is not None:
        pick = (f'<p class="recommended-step">Recommended step: <b>{mark}</b> (DINO {best["dino"]:.3f}, CLIP-T '
                f'{best["clip_t"]:.3f}): {html.escape(best.get("rule", ""))}, margin {best.get("margin")}. '
                f"Export it with <code>dreambooth export OUTPUT_DIR --step best</code> (needs "
                f"validation.keep_checkpoints).</p>")
    else:
        pick = "<p class=small>No recommended step: it needs the dino and clip_t metrics.</p>"
    legend = "; ".join(f"{METRICS[k][0]}: {METRICS[k][2]}" for k in shown)
    return (f"<h3>Scores by step</h3>{pick}<p class=small>{html.escape(legend)}. Shaded: the recommended step; "
            f"dashed: the real photos scored against each other. Scores of random-weight models mean nothing.</p>"
            f"<table class=scores><tr><th>step</th>{head}</tr>{rows}</table>")
