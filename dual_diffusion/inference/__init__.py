"""Inference: the pipelines (text to image, in-painting, captions, VQA) over (graphdef, state)
(pipelines.py). Entry points: dual_diffusion/sample.py, evaluate.py."""
