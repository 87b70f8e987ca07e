"""The recommended step: a documented rule over the DINO and CLIP-T scores of the validated steps."""

from __future__ import annotations

import math

RULE = ("the highest DINO among the validated steps whose CLIP-T is at most eval.clip_t_margin below the first "
        "validated step's (ties: the earlier step)")


def finite(value) -> bool:
    """Whether VALUE is a score: a number, neither NaN nor infinite (missing scores are None)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def recommend(scores: dict, margin: float) -> dict | None:
    """The step to use, from {step: {"dino": .., "clip_t": .., ...}} (steps as ints or digit strings); None
    unless some step has both scores. Later steps learn the subject (DINO rises) and start to ignore the rest of
    the prompt (CLIP-T falls): the rule takes the best subject before prompt fidelity drops by more than `margin`."""
    scored = sorted((int(s), v) for s, v in scores.items() if finite(v.get("dino")) and finite(v.get("clip_t")))
    if not scored:
        return None
    first_step, first = scored[0]
    floor = first["clip_t"] - margin
    eligible = [(s, v) for s, v in scored if v["clip_t"] >= floor - 1e-12]  # the first step always is
    step, best = max(eligible, key=lambda sv: (sv[1]["dino"], -sv[0]))
    return {"step": step, "dino": best["dino"], "clip_t": best["clip_t"], "clip_t_floor": floor,
            "first_step": first_step, "margin": margin, "rule": RULE}
