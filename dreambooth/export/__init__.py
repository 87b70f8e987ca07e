"""What a run writes at the end: the diffusers pipeline folder, single files, LoRA and kohya files."""
