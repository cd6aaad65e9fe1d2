"""Training: state and optimizer (state.py), the dual loss (loss.py), the jitted step (step.py),
Orbax checkpoints of a run (checkpointing.py), metrics and samples, config validation. Entry:
dual_diffusion/train.py."""
