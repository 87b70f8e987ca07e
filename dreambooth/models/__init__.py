"""Stable Diffusion models: loading by hub id, folder or single file, the built-in random-weight models, LoRA."""
