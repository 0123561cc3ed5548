"""What an application may submit as an event: nothing the pipeline would refuse later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from holdwall_stream.outbox.writer import MAX_DATA_DEPTH, NewEvent, json_depth, to_envelope
from holdwall_stream.pipeline.envelope import encode_envelope, parse_envelope
from tests.support.json_values import nested


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("s", 0), ({}, 1), ([], 1), ({"a": [1, {"b": {}}]}, 4), (nested(5000), 5000)],
)
def test_json_depth_counts_objects_and_arrays(value: object, depth: int) -> None:
    assert json_depth(value) == depth


def test_data_nested_past_the_limit_is_refused_naming_data() -> None:
    with pytest.raises(ValidationError) as refused:
        NewEvent(type="t", aggregate_id="k", data=nested(MAX_DATA_DEPTH + 1))
    [error] = refused.value.errors()
    assert error["loc"] == ("data",)
    assert f"nests deeper than {MAX_DATA_DEPTH} levels" in error["msg"]


def test_the_deepest_data_accepted_is_processed_by_the_pipeline() -> None:
    """Stored events travel as envelopes the pipeline parses; one it cannot would be
    accepted with a 201 and dead-lettered as not_json."""
    event = NewEvent(type="t", aggregate_id="k", data=nested(MAX_DATA_DEPTH))
    raw = encode_envelope(to_envelope(event))
    assert parse_envelope(raw, key=b"k", max_bytes=len(raw)).data == event.data


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
def test_data_holding_a_number_json_cannot_carry_is_refused(number: float) -> None:
    """1e400 in a request parses as infinity; the envelope would carry null instead."""
    with pytest.raises(ValidationError, match="holds a number out of range"):
        NewEvent(type="t", aggregate_id="k", data={"totals": [1.5, {"x": number}]})
