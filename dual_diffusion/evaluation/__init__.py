"""Evaluation: suites (shapes, COCO captions, VQAv2, GeneVal prompts; suites.py), their metrics
(VQA accuracy and normalisation, CIDEr; metrics.py), and how items stream through them (global
batches, items/s, resume from partial results; stream.py). Entry point: dual_diffusion/evaluate.py."""
