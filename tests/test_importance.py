import pytest
import torch

from esta.errors import EstaError
from esta.importance import ImportanceSampler, SamplingConfig, budget_groups, snip_score
from esta.selection import choose


def test_budget_groups_are_equal_width_cost_intervals():
    costs = [1.0, 1.1, 5.0, 9.9, 10.0, 5.2]
    groups = budget_groups(costs, groups=3)
    assert groups == [[0, 1], [2, 5], [3, 4]]
    assert sorted(s for g in groups for s in g) == list(range(len(costs)))
    assert budget_groups(costs, groups=10)[0] == [0, 1]  # empty intervals are dropped
    assert len(budget_groups([3.0, 3.0], groups=4)) == 1


def test_moving_average():
    sampler = ImportanceSampler([[0, 1]], 2, SamplingConfig(beta=0.9))
    sampler.initialise({0: 10.0, 1: 0.0})
    sampler.update(0, 0.0)
    assert sampler.importance[0] == pytest.approx(9.0)
    sampler.update(0, 20.0)
    assert sampler.importance[0] == pytest.approx(0.9 * 9.0 + 0.1 * 20.0)
    assert sampler.updates.tolist() == [2, 0]


def test_unscored_stitches_start_from_their_first_score_and_are_tried_first():
    sampler = ImportanceSampler([[0, 1, 2]], 3, SamplingConfig(beta=0.9, eps=0.0))
    sampler.initialise({0: 0.0, 1: 0.0, 2: 0.0})  # zero-initialised adapters: theta * grad is 0 everywhere
    torch.testing.assert_close(sampler.probabilities(0), torch.full((3,), 1 / 3, dtype=torch.float64))
    sampler.update(1, 4.0)
    assert sampler.importance[1] == pytest.approx(4.0)  # not 0.1 * 4.0: no average with the unscored 0
    torch.testing.assert_close(sampler.probabilities(0), torch.full((3,), 1 / 3, dtype=torch.float64))
    sampler.update(0, 2.0)
    torch.testing.assert_close(sampler.probabilities(0), torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64))


def test_zero_initial_scores_do_not_collapse_a_group_onto_its_first_stitch():
    # every stitch of a 12-stitch group scores the same once trained: each should get a fair share of 240 steps
    sampler = ImportanceSampler([list(range(12))], 12, SamplingConfig(), seed=0)
    sampler.initialise({s: 0.0 for s in range(12)})
    for _ in range(240):
        sampler.update(sampler.sample(), 1.0)
    assert int(sampler.updates.min()) >= 8, sampler.updates.tolist()


def test_sampling_frequencies_follow_importance_with_a_floor():
    cfg = SamplingConfig(eps=0.1, tau=1.0)
    groups = [[0, 1, 2], [3]]
    sampler = ImportanceSampler(groups, 4, cfg, seed=0)
    sampler.initialise({0: 6.0, 1: 3.0, 2: 1.0, 3: 5.0})
    p = sampler.probabilities(0)
    expected = 0.9 * torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64) + 0.1 / 3
    torch.testing.assert_close(p, expected)
    n = 20000
    counts = torch.bincount(torch.tensor([sampler.sample() for _ in range(n)]), minlength=4).double()
    # groups are picked uniformly, then stitches by importance inside the group
    assert counts[3] / n == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(counts[:3] / counts[:3].sum(), expected, atol=0.02, rtol=0)


def test_temperature_and_uniform():
    sampler = ImportanceSampler([[0, 1]], 2, SamplingConfig(eps=0.0, tau=0.5))
    sampler.initialise({0: 2.0, 1: 1.0})
    torch.testing.assert_close(sampler.probabilities(0), torch.tensor([0.8, 0.2], dtype=torch.float64))
    uniform = ImportanceSampler([[0, 1]], 2, SamplingConfig(uniform=True))
    uniform.initialise({0: 100.0, 1: 1.0})
    torch.testing.assert_close(uniform.probabilities(0), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_same_seed_same_stitches():
    a = ImportanceSampler([[0, 1, 2], [3, 4]], 5, SamplingConfig(), seed=7)
    b = ImportanceSampler([[0, 1, 2], [3, 4]], 5, SamplingConfig(), seed=7)
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]


def test_snip_score_is_abs_weight_times_grad():
    w = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    w.grad = torch.tensor([0.5, 1.0])
    untouched = torch.nn.Parameter(torch.ones(3))
    assert snip_score([w, untouched]) == pytest.approx(4.0)


def test_deploy_choice_per_group_and_per_budget():
    costs = [1.0, 2.0, 3.0, 4.0]
    groups = [[0, 1], [2, 3]]
    score = [0.1, 0.5, 0.9, 0.2]
    assert [(c.budget, c.stitch_id) for c in choose(groups, costs, score)] == [(2.0, 1), (4.0, 2)]
    # a budget of 3.5 can afford stitch 2 of the top group but not stitch 3
    (c,) = choose(groups, costs, score, budgets=[3.5])
    assert c.stitch_id == 2 and c.candidates == [2]
    with pytest.raises(EstaError, match="below the cheapest"):
        choose(groups, costs, score, budgets=[0.5])


def test_every_stitch_gets_at_least_its_floor_whatever_the_scores():
    # one stitch of each group hogs the scores; the others must still get eps / n of their group's steps
    groups = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    cfg = SamplingConfig(eps=0.2, anchor_share=0.3)
    sampler = ImportanceSampler(groups, 9, cfg, seed=0, anchors=[0, 8])
    sampler.initialise({s: (1e6 if s in (1, 4, 7) else 1e-6) for s in range(9)})
    p = sampler.distribution()
    assert float(p.sum()) == pytest.approx(1.0)
    for s in range(9):
        assert float(p[s]) >= sampler.floor(s) - 1e-12
    assert sampler.floor(2) == pytest.approx(0.7 * 0.2 / 4 / 3)  # eps / n of a third of the non-anchor steps
    assert sampler.floor(0) == pytest.approx(0.7 * 0.2 / 4 / 3 + 0.15)  # plus half the anchors' share
    n = 30000
    counts = torch.bincount(torch.tensor([sampler.sample() for _ in range(n)]), minlength=9).double() / n
    for s in range(9):
        assert float(counts[s]) >= 0.85 * sampler.floor(s), (s, float(counts[s]), sampler.floor(s))
    assert float(counts[0] + counts[8]) >= 0.3  # the anchors' share comes on top of their group draws


def test_snnet_sampler_draws_uniformly_over_all_stitches():
    # SN-Net's training loop: np.random.randint(num_configs), no budget groups
    groups = [[0, 1, 2, 3, 4, 5], [6], [7, 8]]
    from esta.methods import get_method

    snnet = get_method("snnet").sampling(SamplingConfig())  # esta's defaults, as the snnet method turns them
    sampler = ImportanceSampler(groups, 9, snnet, seed=0, anchors=[0, 6, 8])
    torch.testing.assert_close(sampler.distribution(), torch.full((9,), 1 / 9, dtype=torch.float64))
    n = 27000
    counts = torch.bincount(torch.tensor([sampler.sample() for _ in range(n)]), minlength=9).double() / n
    torch.testing.assert_close(counts, torch.full((9,), 1 / 9, dtype=torch.float64), atol=0.01, rtol=0)
    # the group-then-stitch variant (SN-Netv2) gives the lone stitch 6 a third of the steps instead
    grouped = ImportanceSampler(groups, 9, get_method("snnet-groups").sampling(SamplingConfig()), seed=0)
    assert float(grouped.distribution()[6]) == pytest.approx(1 / 3)


def test_per_parameter_score_does_not_favour_larger_paths():
    small = [torch.nn.Parameter(torch.ones(4))]
    large = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(12))]
    for p in small + large:
        p.grad = torch.full_like(p, 0.5)
    assert snip_score(large) == pytest.approx(4 * snip_score(small))
    assert snip_score(large, per_parameter=True) == pytest.approx(snip_score(small, per_parameter=True)) == 0.5


def test_sampling_settings_out_of_range_are_refused():
    for bad in (dict(eps=1.5), dict(beta=-0.1), dict(tau=0.0), dict(anchor_share=2.0), dict(groups=0),
                dict(score="max")):
        with pytest.raises(EstaError):
            ImportanceSampler([[0]], 1, SamplingConfig(**bad))


def test_choice_within_the_budget_never_gets_worse_with_a_larger_budget():
    costs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    groups = [[0, 1], [2, 3], [4, 5]]
    score = [0.5, 0.9, 0.2, 0.3, 0.1, 0.4]  # the best cheap stitch (1) beats everything costlier
    by_group = [c.stitch_id for c in choose(groups, costs, score)]
    by_budget = [c.stitch_id for c in choose(groups, costs, score, within="budget")]
    assert by_group == [1, 3, 5]  # the paper's unit: each group's own best
    assert by_budget == [1, 1, 1]  # a larger budget may always take a cheaper, better stitch
    (c,) = choose(groups, costs, score, budgets=[4.5], within="budget")
    assert c.candidates == [0, 1, 2, 3] and c.stitch_id == 1
    with pytest.raises(EstaError, match="within"):
        choose(groups, costs, score, within="everywhere")


def test_largest_drop_reads_the_curve_from_cheap_to_costly():
    from esta.evaluate import largest_drop

    assert largest_drop([0.5, 0.6, 0.7]) == 0
    assert largest_drop([0.5, 0.8, 0.7, 0.75, 0.9]) == pytest.approx(0.1)


def test_log_spaced_groups_span_equal_cost_ratios():
    # a DeiT-like palette: a cheap pair (1 -> 4) and a costly pair (4 -> 16), 5 stitches each side
    costs = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]
    linear = budget_groups(costs, 4)
    log = budget_groups(costs, 4, spacing="log")
    assert linear[0] == [0, 1, 2, 3, 4, 5]  # equal FLOPs widths: the whole cheap pair in one group of four
    assert [len(g) for g in log] == [2, 3, 2, 4]  # equal ratios: the cheap pair spreads over three groups
    assert sorted(s for g in log for s in g) == list(range(len(costs)))
    with pytest.raises(EstaError, match="positive"):
        budget_groups([0.0, 1.0], 2, spacing="log")
    with pytest.raises(EstaError, match="spacing"):
        budget_groups(costs, 2, spacing="sqrt")
