"""Same seed, same results, before and after a change: a short demo (40 steps) and a tiny language run through two
source trees, compared field by field (timings, paths and provenance aside).

    git worktree add /tmp/before HEAD~3   # or any earlier commit
    python scripts/same_seed.py /tmp/before/src src /tmp/same-seed
"""
import json
import subprocess
import sys
from pathlib import Path

OLD, NEW, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
PY = sys.executable
HERE = Path(__file__).resolve().parents[1]


def esta(src: str, *args: str) -> None:
    code = f"import sys; sys.path.insert(0, {src!r}); from esta.cli import main; sys.exit(main({list(args)!r}))"
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def setup_lm():
    sys.path.insert(0, str(HERE / "tests"))
    from lm_fixtures import save_tiny_lm  # noqa
    from test_recipe import RECORDS  # noqa
    root = OUT / "lm-family"
    fam = [save_tiny_lm(root / "a", "llama", 32, 3, 4, 2, seed=0), save_tiny_lm(root / "b", "llama", 48, 4, 6, 3, seed=1)]
    (root / "data.json").write_text(json.dumps(RECORDS))
    return [str(f) for f in fam], str(root / "data.json")


SKIP = {"seconds", "train_seconds", "select_seconds", "deploy_seconds", "path", "environment", "peak_rss_mb",
        "train_rss_increase_mb", "out_dir", "timing", "command", "created", "wall_seconds", "generation_speed"}


def diff(a, b, where=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in SKIP or any(s in k for s in ("seconds", "time")):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'new' if k in b else 'old'}")
            else:
                out += diff(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and isinstance(b, str) and str(OUT) in a and str(OUT) in b:
        pass  # a path inside each run's own folder
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")
    return out


fam, data = setup_lm()
fields = 0
for name, args in (("demo", ["demo", "--steps", "40", "--compare", "", "--eval-examples", "300", "--no-progress"]),
                   ("lm", ["train", "--anchors", *fam, "--data", data, "--steps", "4", "--no-progress"])):
    res = {}
    for tag, src in (("old", OLD), ("new", NEW)):
        out = OUT / f"{name}-{tag}"
        esta(src, *args, "--out", str(out), "--overwrite")
        res[tag] = json.loads((out / "results.json").read_text())
    d = diff(res["old"], res["new"])
    n = len(json.dumps(res["old"]))
    print(f"{name}: {len(d)} differing fields ({n} characters of results.json compared)")
    for line in d[:30]:
        print("  ", line)
