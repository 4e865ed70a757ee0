"""Training: optimizer, the pure train step, the loop, checkpoints (`python -m jaxtune.train`)."""
