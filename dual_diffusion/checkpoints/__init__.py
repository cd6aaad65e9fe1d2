"""Reading what training and conversion write, for training and inference alike: workdir and checkpoint
paths, local or gs:// (paths.py), and `load_pretrained` over converted checkpoints and training
workdirs (pretrained.py). Writing a run's checkpoints is training/checkpointing.py."""
