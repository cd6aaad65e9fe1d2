"""Inference: the pipelines (text to image, in-painting, captions, VQA) over (graphdef, state)
(pipelines.py), run on a mesh of every device of every process (sharded.py). Entry points:
dual_diffusion/sample.py, evaluate.py."""
