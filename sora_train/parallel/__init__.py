"""Parallelism applied to single-device models from outside, in torchtitan's order.

- ``strategies``: ``apply_parallelism`` (activation checkpointing -> compile) and
  ``build_strategy`` (DDP, DeepSpeed ZeRO 1/2/3 + offload; ``CPUDeepSpeedStrategy`` off CUDA).
- ``consolidate``: ZeRO-sharded or plain Lightning checkpoint -> one fp32 ``.safetensors``.

Import the submodules directly: ``strategies`` pulls in Lightning, ``consolidate`` does not
(DeepSpeed only for ZeRO directories).
"""
