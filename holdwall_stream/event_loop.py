"""Which event loop the worker runs on: uvloop, unless the operator chose one for Faust.

The relay, the pipeline and the web views share one loop, and every database round trip
and Kafka request passes through it: on uvloop, in three interleaved runs each, the
in-process relay drained 5 % faster with a tenth less Python CPU per event, and the
in-process pipeline processed about 10 % more events per second (docs/PERFORMANCE.md).
Faust's own choice wins: ``faust ... -L aio`` (Faust then sets FAUST_LOOP) or the
FAUST_LOOP / F_LOOP variables. Without uvloop installed (Windows) the worker keeps
asyncio's loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Mapping

import mode.loop

PREFERRED_LOOP = "uvloop"
# Faust reads these (and -L/--loop, which it copies into FAUST_LOOP) when it is imported.
FAUST_LOOP_VARIABLES = ("FAUST_LOOP", "F_LOOP")


def loop_to_install(environ: Mapping[str, str], uvloop_installed: bool) -> str | None:
    """The loop to switch to, or None to leave the choice to Faust (or asyncio)."""
    if any(environ.get(name) for name in FAUST_LOOP_VARIABLES):
        return None
    return PREFERRED_LOOP if uvloop_installed else None


def use_preferred_loop(environ: Mapping[str, str]) -> None:
    """Installs uvloop's loop policy unless Faust was told otherwise.

    Call before anything creates the loop (Faust creates it when the worker starts, after
    it imported the app module).
    """
    name = loop_to_install(environ, importlib.util.find_spec(PREFERRED_LOOP) is not None)
    if name is not None:
        mode.loop.use(name)


def running_loop_name() -> str:
    """The running loop's implementation, as /api/health reports it for operators."""
    return implementation_name(asyncio.get_running_loop())


def implementation_name(loop_or_policy: object) -> str:
    """uvloop for uvloop's loop or loop policy, else asyncio."""
    module = type(loop_or_policy).__module__
    return PREFERRED_LOOP if module.startswith(PREFERRED_LOOP) else "asyncio"
