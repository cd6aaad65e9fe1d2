"""PyTorch (diffusers / transformers) <-> dual_diffusion checkpoint conversion."""
