"""holdwall-stream: a transactional outbox relayed to Kafka, processed by a Faust pipeline.

`faust -A holdwall_stream worker` finds ``app`` here; it is built on first access so
that importing the package (CLI, tests) does not read settings or start anything.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from holdwall_stream.faust_app import app

        return app
    raise AttributeError(f"module 'holdwall_stream' has no attribute {name!r}")
