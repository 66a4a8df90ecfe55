"""Training: the one loop every stage uses (``voco.train.loop.train``), checkpoints, DDP helpers, stages."""
