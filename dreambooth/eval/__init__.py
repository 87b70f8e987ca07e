"""Evaluation: DreamBench-style prompts, DINO / CLIP-I / CLIP-T scores, denoising loss and class drift, and the
rule that recommends a step. Used by `dreambooth eval` and by scored validation (training/scoring.py)."""
