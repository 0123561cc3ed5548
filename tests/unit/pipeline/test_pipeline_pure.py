"""Pure pieces of the pipeline: lag arithmetic and the text the database and Kafka headers
can carry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from holdwall_stream.pipeline.consumer import LagSample, pipeline_group_id
from holdwall_stream.pipeline.processor import _array_element, _db_text, _header_text
from holdwall_stream.settings import load_settings


def test_lag_is_end_minus_committed() -> None:
    assert LagSample("t", 0, end_offset=120, committed_offset=100).lag == 20
    assert LagSample("t", 0, end_offset=100, committed_offset=100).lag == 0


def test_lag_is_never_negative_when_the_reported_end_trails() -> None:
    """Tansu reports the start of the last batch + 1 as the end: it can be behind."""
    assert LagSample("t", 1, end_offset=95, committed_offset=100).lag == 0


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=2**62))
def test_lag_property(end: int, committed: int) -> None:
    lag = LagSample("t", 0, end, committed).lag
    assert lag >= 0
    assert lag == (end - committed if end >= committed else 0)


def test_the_pipeline_has_its_own_consumer_group() -> None:
    assert pipeline_group_id(load_settings(kafka_group_id="orders")) == "orders.pipeline"


@given(st.text())
def test_database_text_never_holds_nul(value: str) -> None:
    stored = _db_text(value)
    assert "\x00" not in stored
    assert len(stored) == len(value)
    if "\x00" not in value:
        assert stored is value


@given(st.text())
def test_array_elements_are_quoted_and_escaped(value: str) -> None:
    element = _array_element(value)
    assert element.startswith('"') and element.endswith('"')
    inner = element[1:-1]
    unescaped, i = [], 0
    while i < len(inner):
        if inner[i] == "\\":
            i += 1
        else:
            assert inner[i] != '"', "an unescaped quote ends the element early"
        unescaped.append(inner[i])
        i += 1
    assert "".join(unescaped) == _db_text(value)


@given(st.text(alphabet=st.characters(exclude_categories=[])))  # surrogates too
def test_header_text_always_encodes(value: str) -> None:
    _header_text(value).encode("utf-8")


def test_header_text_keeps_what_encodes_and_escapes_lone_surrogates() -> None:
    assert _header_text("déjà vu ✓") == "déjà vu ✓"
    assert _header_text("bad \ud800 char") == "bad \\ud800 char"
