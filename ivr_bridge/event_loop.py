"""The event loop of the project's own tool processes: the load generator and the stand-ins.

uvloop comes with uvicorn[standard]. Measured on this project's benchmark (BENCHMARKS.md,
issue 14): about 10 % less CPU than asyncio's own loop, for the load generator and for the
stand-ins alike. The bridge itself gets it from uvicorn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coroutine)`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
