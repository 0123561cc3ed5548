"""`python -m benchmarks [name ...]`: runs every benchmark module listed in MODULES, in order.

Each module exposes ``main() -> int`` that prints its own table and returns non-zero when
a floor is missed. Naming modules (``relay``, ``pipeline``) runs only those. In-process
measurements run on the event loop the worker would use (uvloop unless FAUST_LOOP says
otherwise), so that they and the worker processes measure the same thing.
"""

from __future__ import annotations

import importlib
import os
import sys

from holdwall_stream.event_loop import use_preferred_loop

MODULES: tuple[str, ...] = ("benchmarks.relay", "benchmarks.pipeline")


def main(argv: list[str]) -> int:
    wanted = set(argv)
    unknown = wanted - {name.rsplit(".", 1)[-1] for name in MODULES}
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
            f"known: {', '.join(m.rsplit('.', 1)[-1] for m in MODULES)}",
            file=sys.stderr,
        )
        return 2
    use_preferred_loop(os.environ)
    status = 0
    for name in MODULES:
        if wanted and name.rsplit(".", 1)[-1] not in wanted:
            continue
        module = importlib.import_module(name)
        status |= int(module.main() or 0)
        print()
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
