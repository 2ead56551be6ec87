"""The technique contract (bk/technique.py): knobs are typed and validated before anything runs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bk.technique import Forcing, Knob, KnobError

FACTOR = Knob("factor", int, 2, "pooling factor", low=1, high=8, grid=(2, 4))
THRESHOLD = Knob("threshold", float, 0.9, "exit threshold", low=0.0, high=1.0)
PRESET = Knob("preset", str, "b", "a preset", choices=("a", "b"))
SIZE = Knob("size", int, None, "an override", low=1, optional=True)


@given(st.integers(1, 8))
def test_an_integer_knob_takes_integers_and_integral_numbers_and_text(value):
    assert FACTOR.parse(value) == value
    assert FACTOR.parse(float(value)) == value and isinstance(FACTOR.parse(float(value)), int)
    assert FACTOR.parse(str(value)) == value


@pytest.mark.parametrize("value", [2.5, "2.5", True, "two", None, 0, 9, float("nan")])
def test_an_integer_knob_rejects_fractions_booleans_text_and_values_out_of_range(value):
    with pytest.raises(KnobError, match="knob factor: expected an integer in \\[1, 8\\]"):
        FACTOR.parse(value)


@given(st.floats(0.0, 1.0))
def test_a_float_knob_takes_numbers_within_its_range(value):
    assert THRESHOLD.parse(value) == value and THRESHOLD.parse(repr(value)) == value


@pytest.mark.parametrize("value", ["high", -0.1, 1.5, float("nan"), float("inf"), False, None])
def test_a_float_knob_names_itself_when_it_rejects_a_value(value):
    with pytest.raises(KnobError, match="knob threshold: expected a number in \\[0, 1\\]"):
        THRESHOLD.parse(value)


def test_choices_and_optional_knobs():
    assert PRESET.parse("a") == "a"
    with pytest.raises(KnobError, match="one of 'a', 'b'"):
        PRESET.parse("c")
    assert SIZE.parse(None) is None and SIZE.parse("none") is None and SIZE.parse("3") == 3
    with pytest.raises(KnobError, match="knob size: expected an integer >= 1 or none"):
        SIZE.parse(0)


def test_a_declaration_whose_default_or_grid_breaks_its_own_range_is_refused():
    with pytest.raises(KnobError, match="knob k"):
        Knob("k", int, 2.5, "")
    with pytest.raises(KnobError, match="knob k"):
        Knob("k", float, 0.5, "", low=0, high=1, grid=(0.5, 2.0))
    with pytest.raises(TypeError, match="kind"):
        Knob("k", list, [], "")


def test_forcing_checks_its_rate_and_pattern():
    assert Forcing(0.5, "per_token").keep == 0.5
    for keep in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            Forcing(keep)
    with pytest.raises(ValueError, match="pattern"):
        Forcing(0.5, "random")
