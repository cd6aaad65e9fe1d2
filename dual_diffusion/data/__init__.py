"""Data: grain pipelines over real sources (pipeline.py, sources.py, transforms.py),
token layouts (text_layout.py), and the built-in shapes world with its exact
evaluator (shapes.py, shapes_prompts.py, shapes_eval.py)."""
