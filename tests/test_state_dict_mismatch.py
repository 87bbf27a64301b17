"""rdm.checkpoint.state_dict_mismatch: the one-line account of a state dict that does not fit
(shared by the official-checkpoint import and the FID Inception loader)."""

import torch

from rdm.checkpoint import state_dict_mismatch


def test_a_fitting_state_dict_has_no_account():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert state_dict_mismatch(expected, {"b": torch.ones(4), "a": torch.ones(2, 3)}) == ([], "")


def test_missing_unexpected_and_reshaped_are_counted_and_named():
    expected = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros(4),
        "c": torch.zeros(1),
        "d": torch.zeros(5),
    }
    state = {"x": torch.zeros(1), "b": torch.zeros(8), "a": torch.zeros(3, 2), "y": torch.zeros(1)}
    unexpected, line = state_dict_mismatch(expected, state)
    assert unexpected == ["x", "y"]  # in the state's order
    assert line == (
        "2 missing (e.g. c), 2 unexpected (e.g. x), "
        "2 of another shape (e.g. a: (3, 2) in the file, (2, 3) expected)"
    )
    _, line = state_dict_mismatch(
        expected, state, unexpected_as="not in the model", shapes_as=("here", "there"), examples=2
    )
    assert line == (
        "2 missing (e.g. c, d), 2 not in the model (e.g. x, y), "
        "2 of another shape (e.g. a: (3, 2) here, (2, 3) there; b: (8,) here, (4,) there)"
    )
