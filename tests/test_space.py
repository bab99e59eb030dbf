import json

import pytest

from esta.cli import main
from esta.errors import EstaError
from esta.space import build_space, natural_start, paired_cuts


def test_snnet_deit_palette_has_71_stitches():
    space = build_space([12, 12, 12])
    d = space.to_dict()
    assert d["count"] == 71
    assert d["pairs"] == {"0->1": {"stitches": 34, "stitching_layers": 11},
                          "1->2": {"stitches": 34, "stitching_layers": 11}}
    assert [s.id for s in space.stitches] == list(range(71))
    assert sum(s.is_anchor for s in space.stitches) == 3


def test_equal_depth_windows_are_snnet_paired_stitching():
    windows = paired_cuts(12, 12, kernel=2, stride=1)
    assert windows[0] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert windows[1] == [(1, 2), (2, 1), (2, 2)]
    assert len(windows) == 11
    assert all(0 <= j < 12 and 0 <= m < 12 for w in windows for j, m in w)


@pytest.mark.parametrize("depths", [(24, 28), (32, 40), (12, 24), (28, 24)])
def test_unequal_depths(depths):
    la, lb = depths
    space = build_space(depths)
    cuts = [(s.front_last, s.end_first) for s in space.stitches if not s.is_anchor]
    assert len(cuts) == len(set(cuts)) > la  # no duplicates, at least one per front block
    assert all(0 <= j < la and 0 <= m < lb for j, m in cuts)
    # every front block has a cut at (or next to) its natural continuation in the other anchor
    for j in range(la):
        n = natural_start(j, la, lb)
        assert any(jj == j and abs(m - n) <= 1 for jj, m in cuts)


def test_natural_start_rounds_half_up():
    assert natural_start(2, 24, 28) == 4  # 3.5 -> 4
    assert natural_start(0, 24, 28) == 1
    assert natural_start(5, 12, 12) == 6


def test_options_change_the_space():
    assert len(build_space([12, 12, 12], two_way=True)) == 3 + 4 * 34
    assert len(build_space([12, 12, 12], pairing="all")) == 3 + 3 * 34
    assert len(build_space([12, 12], kernel=1)) == 2 + 12


def test_bad_windows_are_refused():
    with pytest.raises(EstaError):
        build_space([12, 12], kernel=0)


def test_cli_space_json(capsys):
    assert main(["space", "--depths", "12,12,12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 71
    assert main(["space", "--depths", "24,28", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == len(build_space([24, 28])) and out["depths"] == [24, 28]
