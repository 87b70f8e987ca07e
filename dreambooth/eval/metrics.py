"""DreamBench's scores from embeddings: DINO and CLIP-I (mean pairwise cosine similarity, generated vs real
images), CLIP-T (each image against its prompt), and the real-vs-real reference."""

from __future__ import annotations

import torch

# Ruiz et al., DreamBooth (CVPR 2023), Table 1 on DreamBench: Stable Diffusion DreamBooth and real images.
PAPER = {"DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
         "real images": {"dino": 0.774, "clip_i": 0.885, "clip_t": None}}


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()  # sums of many cosines: keep identical inputs at exactly 1 within float tolerance
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities of two sets of embeddings."""
    return _unit(a) @ _unit(b).T


def mean_pairwise(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated, real) pair: DINO with DINO embeddings, CLIP-I with CLIP's."""
    return float(cosine_matrix(generated, real).mean())


def self_similarity(real: torch.Tensor) -> float | None:
    """Mean cosine similarity over every pair of different real images (the reference a model is compared
    with); None with fewer than two images."""
    n = len(real)
    if n < 2:
        return None
    sims = cosine_matrix(real, real)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def paired(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine similarity of each image embedding with its own text embedding (CLIP-T)."""
    return float((_unit(images) * _unit(texts)).sum(-1).mean())


def mean_of(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
