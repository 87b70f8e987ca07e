"""DreamBooth fine-tuning of Stable Diffusion 2.1 base, JumpStart-compatible, on one GPU."""

__version__ = "0.1.0"
