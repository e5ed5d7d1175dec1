"""Training: objectives (the inner max and the loss), the loop, checkpoints, configuration, DDP."""
