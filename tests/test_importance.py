import pytest
import torch

from esta.deploy import choose
from esta.errors import EstaError
from esta.importance import ImportanceSampler, SamplingConfig, budget_groups, snip_score


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
