import json

import pytest
from helpers import image_folder

from esta.bench import BenchConfig, run_bench, slug

FIELDS = {"group_accuracy", "mean_accuracy", "train_seconds", "trainable_params", "peak_rss_mb", "deploy_seconds",
          "mean_regret", "deployed", "anchors"}


def test_bench_runs_every_method_side_by_side_and_reuses_finished_runs(tmp_path, vit_family, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
    data = str(image_folder(tmp_path / "data", per_class=40))
    cfg = BenchConfig.quick(anchors=vit_family, tasks=[data], methods=["esta", "snnet", "linear-probe"], steps=4,
                            regret_methods=["esta"], out_dir=str(tmp_path / "bench"), progress=False)
    bench = run_bench(cfg)
    on_disk = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert on_disk["tasks"].keys() == {data}
    for method in ("esta", "snnet", "linear-probe"):
        r = on_disk["tasks"][data][method]
        # the same budgets for every method: the 10 groups' tops and the anchors' own costs
        n = len(on_disk["tasks"][data]["esta"]["deployed"])
        assert FIELDS <= r.keys() and 10 <= len(r["group_accuracy"]) == n <= 13
        assert [d["budget"] for d in r["deployed"]] == [d["budget"] for d in on_disk["tasks"][data]["esta"]["deployed"]]
        assert [set(d) >= {"flops", "accuracy", "accuracy_std"} for d in r["deployed"]] == [True] * n
        assert [a["name"] for a in r["anchors"]] == ["a0", "a1", "a2"]  # the test family's folder names
    probe = on_disk["tasks"][data]["linear-probe"]
    assert all(a["accuracy"] is not None for a in probe["anchors"]) and probe["steps"] == 0
    assert {row["reference"] for row in bench["claims"][data]["esta_at_anchor_budgets"]} == {"linear-probe"}
    esta, snnet = on_disk["tasks"][data]["esta"], on_disk["tasks"][data]["snnet"]
    assert esta["trainable_params"] < snnet["trainable_params"]  # PST against full fine-tuning
    assert bench["claims"][data]["trainable_params_ratio"] < 1
    assert esta["mean_regret"] is not None  # ESTA's runs sweep every stitch on test for the regret
    assert "| esta |" in (tmp_path / "bench" / "bench.md").read_text()
    assert (tmp_path / "bench" / f"pareto-{slug(data)}.png").stat().st_size > 5_000
    assert not list((tmp_path / "data").rglob("results.json"))  # runs live under the bench folder
    # a second start reuses the finished runs instead of training again
    results = sorted((tmp_path / "bench").rglob("results.json"))
    mtimes = [p.stat().st_mtime for p in results]
    run_bench(cfg)
    assert [p.stat().st_mtime for p in results] == mtimes
    # ... but not a run made with other settings (a full bench after a quick one trains again)
    run_bench(BenchConfig.quick(**{**cfg.__dict__, "steps": 5}))
    assert all(p.stat().st_mtime > m for p, m in zip(results, mtimes))


def test_bench_skips_the_test_sweep_for_methods_without_regret(tmp_path, vit_family, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
    data = str(image_folder(tmp_path / "data", per_class=40))
    cfg = BenchConfig.quick(anchors=vit_family, tasks=[data], methods=["esta-uniform"], steps=4,
                            out_dir=str(tmp_path / "bench"), progress=False)
    r = run_bench(cfg)["tasks"][data]["esta-uniform"]
    assert r["mean_regret"] is None and r["sweep_seconds"] < 0.01
    assert 10 <= len(r["group_accuracy"]) <= 13 and all(0 <= a <= 1 for a in r["group_accuracy"])


def test_the_sweep_run_at_the_chosen_rate_is_reused_and_the_ablations_run_on_the_first_task(tmp_path, monkeypatch):
    import esta.bench as bench
    from esta.results import Point, RunResults

    calls = []

    def fake_run(cfg, task, method, seed, lr, out, sweep=True):  # a run whose validation score rises with lr
        calls.append((task, method, seed, lr, "lr-sweep" in str(out)))
        v = 0.5 + 10 * (lr or 0.0) + 0.01 * seed
        return RunResults(method=method, task=task, task_kind="image-classification", metric="accuracy",
                          cost_axis="flops", deploy_by="validation",
                          deployed=[Point("Ti", 1.0, 1.0, 1.0, v, budget=1.0, validation=v)],
                          anchors=[Point("Ti", 1.0, 1.0, 1.0, v)], seed=seed, lr=lr or 0.0, steps=cfg.steps,
                          train_seconds=1.0, trainable_params=1, total_params=2, peak_rss_mb=1.0)

    monkeypatch.setattr(bench, "_run", fake_run)
    monkeypatch.setattr(bench, "bench_plot", lambda *a, **k: None)
    out = run_bench(BenchConfig(tasks=["t1", "t2"], out_dir=str(tmp_path), progress=False))
    assert out["learning_rates"]["esta"] == max(bench.LR_GRID["esta"])
    assert out["learning_rates"]["snnet"] == max(bench.LR_GRID["snnet"])
    finals = [c for c in calls if not c[4]]
    for method in bench.LR_GRID:  # the first task's first seed is the sweep's run at the chosen rate, not a new one
        if bench.LR_GRID[method]:
            assert ("t1", method, 0) not in [c[:3] for c in finals]
            assert out["tasks"]["t1"][method]["seeds"] == [0, 1]
    for ablation in bench.ABLATIONS:
        assert ablation in out["tasks"]["t1"] and ablation not in out["tasks"]["t2"]
    assert "importance_minus_uniform_points" in out["claims"]["t1"]
    assert "importance_minus_uniform_points" not in out["claims"]["t2"]
    assert "linear-probe" in out["tasks"]["t2"] and "esta" in out["tasks"]["t2"]


def test_a_palette_trains_for_the_examples_of_every_anchor_tuned_alone(tmp_path, monkeypatch):
    """The user's price: three anchors tuned alone for N steps each cost 3N steps, which a palette gets in all; the
    claims set each palette anchor beside the same anchor tuned alone, seed by seed, and carry the pair curves."""
    import esta.bench as bench
    from esta.results import Point, RunResults

    seen = {}

    def fake_run(cfg, task, method, seed, lr, out, sweep=True):
        seen[method] = bench.palette_steps(cfg) if not bench.get_method(method).anchors_only else cfg.steps
        v = {"esta": 0.70, "anchors-lora": 0.72}.get(method, 0.6) + 0.01 * seed
        pair = {"front_name": "Ti", "end_name": "S", "count": 2, "spearman": 0.5 + seed / 10,
                "most_end": {"name": "0[:1]->1[0:]", "gap_to_end": 0.01}, "above_cheaper": 1}
        pairs = [pair] if method == "esta" else []
        return RunResults(method=method, task=task, task_kind="image-classification", metric="accuracy",
                          cost_axis="flops", deploy_by="validation",
                          deployed=[Point("Ti", 1.0, 1.0, 1.0, v, budget=1.0, validation=v)],
                          anchors=[Point("Ti", 1.0, 1.0, 1.0, v), Point("S", 4.0, 4.0, 4.0, v + 0.05)], seed=seed,
                          lr=lr or 0.0, steps=1, train_seconds=1.0, trainable_params=1, total_params=2,
                          peak_rss_mb=1.0, pairs=pairs, in_between={"share": 0.5})

    monkeypatch.setattr(bench, "_run", fake_run)
    monkeypatch.setattr(bench, "bench_plot", lambda *a, **k: None)
    out = run_bench(BenchConfig(tasks=["t1"], methods=["esta", "anchors-lora"], steps=7, lr_sweep=False,
                                out_dir=str(tmp_path), progress=False))
    assert seen == {"esta": 21, "anchors-lora": 7}  # the mini family has three anchors
    assert out["palette_steps"] == 21
    rows = {r["anchor"]: r for r in out["claims"]["t1"]["palette_anchor_minus_alone"]}
    assert rows["Ti"]["points"] == pytest.approx(-2.0) and rows["S"]["points_per_seed"] == pytest.approx([-2.0, -2.0])
    (pair,) = out["claims"]["t1"]["esta_pairs"]
    assert pair["pair"] == "Ti->S" and pair["spearman_per_seed"] == [0.5, 0.6]
    assert pair["most_end_gap"] == pytest.approx(1.0) and out["claims"]["t1"]["esta_in_between_share"] == 0.5
    assert "anchor Ti in ESTA's palette" in (tmp_path / "bench.md").read_text()
    one = BenchConfig(steps=7, price="one")
    assert bench.palette_steps(one) == 7
