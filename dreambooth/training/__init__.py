"""The training run: the Trainer and what it composes (inputs, optimizer, memory profiles, checkpoints, log)."""
