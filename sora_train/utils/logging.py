"""Rank-zero aware logging: every rank logs warnings, only rank 0 logs info."""

from __future__ import annotations

import logging
import os

_RANK_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "PMI_RANK")


def global_rank() -> int:
    for var in _RANK_VARS:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                continue
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_rank_zero()


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger
