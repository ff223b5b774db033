"""Hydra config tree, installed as sora_train.conf (see setup.py)."""
