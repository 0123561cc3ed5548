"""`python -m benchmarks [name ...]`: runs every benchmark module listed in MODULES, in order.

Each module exposes ``main() -> int`` that prints its own table and returns non-zero when
a floor is missed. Naming modules (``relay``, ``pipeline``) runs only those.
"""

from __future__ import annotations

import importlib
import sys

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
