"""docs/KAFKA_QUICK_REFERENCE.md documents every setting, and the checklist's commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from holdwall_stream.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "KAFKA_QUICK_REFERENCE.md"


def _documented_rows() -> dict[str, list[str]]:
    """Table rows whose first cell is an upper-case `VARIABLE`: name -> cells."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if len(cells) >= 4 else None
        if match:
            rows[match.group(1)] = cells
    return rows


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented_with_default_and_meaning(field: str) -> None:
    rows = _documented_rows()
    name = field.upper()
    assert name in rows, (
        f"{name} is missing from {DOC.name}: add a row (default, accepted, meaning)"
    )
    _, default, accepted, meaning = rows[name][:4]
    assert default and accepted and meaning, f"{name}: fill in default, accepted and meaning"


def test_documented_defaults_match_the_code() -> None:
    rows = _documented_rows()
    for name, value in [
        ("KAFKA_ENABLED", "false"),
        ("KAFKA_BROKERS", "localhost:9092"),
        ("KAFKA_CONNECTION_TIMEOUT", "10000"),
        ("KAFKA_REQUEST_TIMEOUT", "30000"),
        ("KAFKA_SSL", "false"),
        ("KAFKA_TLS", "false"),
        ("KAFKA_EVENTS_TOPIC", "holdwall-events"),
        ("KAFKA_DLQ_TOPIC", "holdwall-dlq"),
        ("KAFKA_GROUP_ID", "holdwall-stream"),
        ("KAFKA_PARTITIONS", "3"),
        ("KAFKA_VALIDATE_ON_STARTUP", "false"),
        ("WEB_PORT", "3000"),
    ]:
        assert rows[name][1] == f"`{value}`", (name, rows[name][1])
    for field, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, bool | int):
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert rows[field.upper()][1].startswith(f"`{shown}`"), (field, rows[field.upper()])


def test_nothing_documented_that_does_not_exist() -> None:
    unknown = set(_documented_rows()) - {field.upper() for field in Settings.model_fields}
    assert not unknown, f"documented but not settings: {sorted(unknown)}"


def test_checklist_quick_commands_are_there() -> None:
    text = DOC.read_text()
    for command in (
        "curl -s localhost:3000/api/health",
        "curl -s localhost:3000/api/metrics",
        "holdwall-stream verify",
        'grep -i "kafka.*connection.*error"',
        "ENOTFOUND|getaddrinfo",
        '"circuit breaker"',
    ):
        assert command in text, command
