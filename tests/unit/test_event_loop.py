"""The worker's loop choice: uvloop by default, Faust's FAUST_LOOP / F_LOOP (or -L) win."""

from __future__ import annotations

import pytest

from holdwall_stream.event_loop import loop_to_install


def test_uvloop_by_default() -> None:
    assert loop_to_install({}, uvloop_installed=True) == "uvloop"


@pytest.mark.parametrize("variable", ["FAUST_LOOP", "F_LOOP"])
@pytest.mark.parametrize("chosen", ["aio", "uvloop"])
def test_the_operators_choice_for_faust_is_left_alone(variable: str, chosen: str) -> None:
    assert loop_to_install({variable: chosen}, uvloop_installed=True) is None


def test_without_uvloop_asyncio_stays() -> None:
    assert loop_to_install({}, uvloop_installed=False) is None


def test_an_empty_variable_is_no_choice() -> None:
    assert loop_to_install({"FAUST_LOOP": ""}, uvloop_installed=True) == "uvloop"
