"""What every benchmark module needs: a fresh PostgreSQL database, percentiles, one table.

PostgreSQL comes from TEST_DATABASE_URL (an admin connection) or the PG* variables, as in
the tests; the database a benchmark creates is dropped when it ends, whatever happens.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from holdwall_stream.settings import Settings, load_settings

# Both benchmarks' topics: 3 partitions, so 3 relay lanes and 3 pipeline consumers.
PARTITIONS = 3
SESSION_TIMEOUT_MS = 6000  # Tansu completes a group join after half the session timeout


def bench_settings(database_url: str, bootstrap: str, suffix: str, **extra: object) -> Settings:
    """Kafka enabled, topics and group of this run's own (named by ``suffix``)."""
    options: dict[str, object] = {
        "kafka_enabled": True,
        "kafka_brokers": bootstrap,
        "database_url": database_url,
        "kafka_events_topic": f"bench-events-{suffix}",
        "kafka_dlq_topic": f"bench-dlq-{suffix}",
        "kafka_group_id": f"bench-{suffix}",
        "kafka_partitions": PARTITIONS,
        "kafka_session_timeout": SESSION_TIMEOUT_MS,
    }
    return load_settings(**(options | extra))


def worker_environment(settings: Settings) -> dict[str, str]:
    """The variables that give a `faust -A holdwall_stream worker` these settings' Kafka,
    topics, group and database."""
    return {
        "KAFKA_ENABLED": "true",
        "KAFKA_BROKERS": settings.kafka_brokers,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "KAFKA_EVENTS_TOPIC": settings.kafka_events_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
        "KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "KAFKA_SESSION_TIMEOUT": str(settings.kafka_session_timeout),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def histogram_quantile(cumulative: Sequence[tuple[float, float]], q: float) -> float:
    """The q-th percentile (0-100) of a Prometheus histogram, from its cumulative buckets
    ``(upper bound, count)`` in ascending order, interpolated linearly inside the bucket
    (as PromQL's histogram_quantile does); NaN for no observations."""
    total = cumulative[-1][1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    rank = q / 100 * total
    lower, below = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: report that bound
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


@dataclass(frozen=True)
class Measurement:
    section: str
    name: str
    value: float
    unit: str
    ratio: str = ""
    note: str = ""


def format_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit in ("events/s", "msg/s", "rows/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "s":
        return f"{value:,.2f} s"
    return f"{value:,.2f} {unit}".strip()


def render_table(title: str, rows: Sequence[Measurement]) -> str:
    """A Markdown table, so the output can be pasted into docs/PERFORMANCE.md as it is."""
    header = ("", "measurement", "result", "vs ceiling", "note")
    body = [(r.section, r.name, format_value(r.value, r.unit), r.ratio, r.note) for r in rows]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"### {title}", "", line(header), separator, *(line(b) for b in body)])


def cpu_seconds_by_pid() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds used so far, user + system) of every live process
    (Linux /proc; empty elsewhere). Processes outside this process's tree are named
    ``other <name>``, except PostgreSQL's (whose backends the benchmark's connections use)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[str, int, float]] = {}
    if not os.path.isdir("/proc"):
        return {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if name.startswith("tansu"):
            name = "tansu"
        stats[int(entry)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (_name, ppid, _used) in stats.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return {
        pid: (name if pid in ours or name == "postgres" else f"other {name}", used)
        for pid, (name, _ppid, used) in stats.items()
    }


class CpuSplit:
    """CPU cores used per command name between ``start()`` and ``stop()``, from the
    processes alive at the end (one that exited in between is missed). On a shared
    machine it shows whether something else competed for the CPU."""

    def __init__(self) -> None:
        self._before: dict[int, tuple[str, float]] = {}
        self._started = 0.0
        self.cores: dict[str, float] = {}

    def start(self) -> CpuSplit:
        self._before = cpu_seconds_by_pid()
        self._started = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        elapsed = max(1e-9, time.perf_counter() - self._started)
        cores: dict[str, float] = {}
        for pid, (name, used) in cpu_seconds_by_pid().items():
            before = self._before.get(pid)
            if before is None:  # started during the window: all of its time counts
                cores[name] = cores.get(name, 0.0) + used / elapsed
            elif before[0] == name:
                cores[name] = cores.get(name, 0.0) + (used - before[1]) / elapsed
        self.cores = {name: value for name, value in cores.items() if value >= 0.01}
        return self.cores

    def describe(self, top: int = 3) -> str:
        ordered = sorted(self.cores.items(), key=lambda item: -item[1])[:top]
        return ", ".join(f"{name} {cores:.2f}" for name, cores in ordered)

    def ours(self) -> dict[str, float]:
        """Cores of the system under test: PostgreSQL and this benchmark's processes."""
        return {name: cores for name, cores in self.cores.items() if not name.startswith("other ")}

    def cores_used(self) -> float:
        """Cores the system under test used in all."""
        return sum(self.ours().values())

    def us_per_item(self, rate: float) -> float:
        """CPU microseconds the system under test spent per item at ``rate`` items/s."""
        return self.cores_used() / rate * 1e6

    def describe_per_item(self, rate: float) -> str:
        """CPU microseconds per item by process, e.g. "postgres 16.4 + python 1.6 = 18.0 us"."""
        ordered = sorted(self.ours().items(), key=lambda item: -item[1])
        parts = " + ".join(f"{name} {cores / rate * 1e6:.1f}" for name, cores in ordered)
        return f"{parts} = {self.us_per_item(rate):.1f} us"
