"""Constructor kwargs read back from an object: what every ``config()`` returns.

Models, text encoders and re-writers record how to rebuild them (exports, shard-set indexes)
as their constructor arguments. Each stores an argument under the argument's own name, so
``config()`` reads them back from the signature instead of listing them by hand a second
time: a new argument cannot be forgotten in ``config()`` (a value not stored raises).
"""

from __future__ import annotations

import inspect
from typing import Any


def constructor_kwargs(obj: Any, cls: type | None = None, **given: Any) -> dict[str, Any]:
    """``{arg: getattr(obj, arg)}`` for each named argument of ``cls.__init__`` (default
    ``type(obj)``), in signature order; ``*args``/``**kwargs`` are skipped and ``given``
    supplies the values stored otherwise (e.g. ``dtype=self.dtype_name``).

    Raises AttributeError naming the argument when ``obj`` stores neither.
    """
    params = inspect.signature((cls or type(obj)).__init__).parameters.values()
    names = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"constructor_kwargs: {unknown} are not arguments of {(cls or type(obj)).__name__}")
    return {n: given[n] if n in given else getattr(obj, n) for n in names}
