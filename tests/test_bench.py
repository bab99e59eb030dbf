import json

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
