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
    assert len(build_space([12, 12, 12], pairing="all")) == 732  # SN-Net without nearest stitching
    assert len(build_space([12, 12, 24], pairing="all")) == 3 + 34 + 2 * 45  # unequal depths: two-segment pairs
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


def test_the_peers_spaces_route_by_route():
    """SN-Net without nearest stitching (732 for Ti/S/B) and SN-Netv2's two-way space with its three-segment routes
    (134 for 12/24 blocks), rebuilt from their rules; SN-Net's nearest space is exactly esta's own."""
    from esta.routes import peer_space, window_pairs

    assert len(window_pairs(12)) == 34 and window_pairs(12)[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    nearest = peer_space("snnet", [12, 12, 12])
    ours = build_space([12, 12, 12])
    assert {(r.segments[0][0], r.segments[0][2], r.segments[1][0], r.segments[1][1]) for r in nearest
            if len(r.segments) == 2} == {(s.front, s.front_last, s.end, s.end_first) for s in ours.stitches
                                          if not s.is_anchor}
    every = peer_space("snnet-all", [12, 12, 12])
    kinds = [r.kind for r in every]
    assert len(every) == 732 and kinds.count("0->2") == 34 and kinds.count("0->1->2") == 627
    chain = [r for r in every if r.kind == "0->1->2"]
    assert all(r.segments[1][2] >= r.segments[1][1] for r in chain)  # the middle anchor runs one block or more
    assert ((0, 0, 0), (1, 0, 11), (2, 11, 11)) in {r.segments for r in chain}  # c >= b, d from the window of c
    v2 = peer_space("snnetv2", [12, 24])
    kinds = [r.kind for r in v2]
    assert len(v2) == 134 and (kinds.count("0->1"), kinds.count("1->0")) == (11, 11)
    assert kinds.count("1->0->1") == kinds.count("0->1->0") == 55
    assert all(r.segments[0][2] % 2 == 1 for r in v2 if r.kind == "1->0")  # odd cuts of the large anchor only
    assert ((0, 0, 10), (1, 22, 23)) in {r.segments for r in v2} and ((0, 0, 11), (1, 24, 23)) not in \
        {r.segments for r in v2}  # the cut after S's last block leaves no L block: built by SN-Netv2, not selectable
    assert main(["space", "--peers", "snnetv2", "--depths", "12,24"]) == 0
