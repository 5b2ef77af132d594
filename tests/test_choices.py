"""The ground floor: one home for each choice and one parser (the import order itself is checked by
tests/test_layering.py)."""

from __future__ import annotations

import pytest

import fewbit
from fewbit import choices, formats, qtensor, scaling
from fewbit.kernels import cast as cast_kernel


def test_each_choice_has_one_home_and_its_old_names_still_work():
    assert fewbit.Rounding is formats.Rounding is cast_kernel.Rounding is qtensor.Rounding is choices.Rounding
    assert fewbit.Overflow is formats.Overflow is cast_kernel.Overflow is choices.Overflow
    assert scaling.ScaleMode is choices.ScaleMode and scaling.AmaxAlgo is choices.AmaxAlgo
    assert formats.parse_choice is scaling.parse_choice is choices.parse_choice


@pytest.mark.parametrize("kind", [choices.Rounding, choices.Overflow, choices.ScaleMode, choices.AmaxAlgo])
def test_parse_choice_takes_members_and_strings_and_names_every_valid_value(kind):
    for member in kind:
        assert choices.parse_choice(kind, member, "x") is member
        assert choices.parse_choice(kind, member.value, "x") is member
    with pytest.raises(ValueError, match="unknown thing 'nope'; valid: ") as error:
        choices.parse_choice(kind, "nope", "thing")
    assert all(m.value in str(error.value) for m in kind)
