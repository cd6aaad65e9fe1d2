"""Networks only: the D-DiT MM-DiT, the T5 v1.1 encoder and the SD3 VAE (Flax NNX)."""
