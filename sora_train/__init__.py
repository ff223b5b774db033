"""sora_train: a research training framework for Sora-style video generation.

Layers (dependencies point one way): utils -> {data, models, rewrite, diffusion} -> parallel
-> training -> cli. Everything below `cli` is plain Python objects; only `cli` reads configs.
"""

__version__ = "0.1.0"
