"""Reading .pth state dicts as data: both torch layouts round-trip; anything beyond tensors is refused unrun."""

import pickle

import pytest
import torch

from surgeon.errors import SurgeonError
from surgeon.io.torchfile import read_state_dict


def _state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "w": base,
        "w_t": base.t(),
        "view": base[1:3, 2:],
        "ids": torch.arange(5),
        "half": torch.randn(3).half(),
        "flag": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("zip_layout", [True, False])
def test_round_trip_of_both_layouts(tmp_path, zip_layout):
    state = _state()
    path = tmp_path / "w.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_layout)
    got = read_state_dict(path)
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > never_written",))


@pytest.mark.parametrize("zip_layout", [True, False])
def test_a_pickle_that_calls_code_is_refused_before_anything_runs(tmp_path, monkeypatch, zip_layout):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _Boom()}, path, _use_new_zipfile_serialization=zip_layout)
    with pytest.raises(SurgeonError, match="names (posix|os|nt).system"):
        read_state_dict(path)
    assert not (tmp_path / "never_written").exists()


def test_opcodes_outside_the_subset_are_refused(tmp_path):
    path = tmp_path / "set.pth"
    torch.save({"w": torch.ones(2), "s": {1, 2}}, path, pickle_protocol=4)  # a set: EMPTY_SET, ADDITEMS
    with pytest.raises(SurgeonError, match="opcode"):
        read_state_dict(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SurgeonError, match="neither a zip nor a legacy torch file"):
        read_state_dict(path)
