"""Evaluation: suites (shapes, COCO captions, VQAv2, GeneVal prompts; suites.py) and their metrics
(VQA accuracy and normalisation, CIDEr; metrics.py). Entry point: dual_diffusion/evaluate.py."""
