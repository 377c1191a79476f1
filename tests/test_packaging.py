import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"] + ["-e ."]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == wanted
    assert "python=3.11" in env["dependencies"]


def test_top_level_layout():
    for name in ("notebooks", "tcmlab", "data", "tests", "environment.yml", "README.md", "pyproject.toml", "Makefile",
                 ".ci/run"):
        assert (ROOT / name).exists(), name


def test_gpu_check_script_runs_every_part_and_writes_its_records(tmp_path):
    # .ci/gpu-check is what a session with a GPU runs in one go; here on the CPU with the digits MLP, torch.compile
    # disabled (TORCHDYNAMO_DISABLE) and tests/gpu skipping, so that a broken part shows before GPU time is spent.
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BENCH="--net mlp --batch 4 --device cpu --rounds 3",
               GPU_CHECK_TRAIN="--preset ci --stage 0 --device cpu", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / ".ci/gpu-check"), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=900)
    log = (tmp_path / "gpu-check.log").read_text()
    assert r.returncode == 0, log[-3000:]
    parts = ["env", "bench-fp32", "recipes", "bench-bf16", "bench-bf16-fast", "tests-gpu", "train-paper"]
    for name in parts:
        assert f"== {name}: rc=0 in" in log, (name, log[-3000:])
    assert sorted(parts, key=lambda name: log.index(f"== {name} (limit")) == parts  # the most wanted first
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(recs) == {"bench-ddpmpp-fp32.json", "bench-ddpmpp-recipes.json", "bench-ddpmpp-bf16.json",
                         "bench-ddpmpp-bf16-fast.json"}
    fast = recs["bench-ddpmpp-bf16-fast.json"]
    assert (fast["precision"], fast["compile"], fast["channels_last"]) == ("bf16", True, True)
    assert "profile" in recs["bench-ddpmpp-fp32.json"] and "recipe_speedup" in recs["bench-ddpmpp-recipes.json"]
    assert "skipped" in log  # tests/gpu collected and skipped, with its reason, on a machine without CUDA
    assert log.count('"sec_per_step"') == 2  # the two training runs' last metrics rows


def test_gpu_check_runs_only_the_parts_named_and_within_its_budget(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BENCH="--net mlp --batch 4 --device cpu --rounds 2",
               TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    run = lambda out, *parts, **extra: subprocess.run(  # noqa: E731
        ["bash", str(ROOT / ".ci/gpu-check"), str(out), *parts], env={**env, **extra}, capture_output=True,
        text=True, timeout=600, cwd=tmp_path)
    assert run("a", "env", "bench-bf16").returncode == 0  # a relative OUTDIR is the caller's
    log = (tmp_path / "a" / "gpu-check.log").read_text()
    assert "== env: rc=0" in log and "== bench-bf16: rc=0" in log and "bench-fp32" not in log
    assert [p.name for p in (tmp_path / "a").glob("*.json")] == ["bench-ddpmpp-bf16.json"]
    assert run("b", GPU_CHECK_BUDGET="10").returncode == 0  # no time left: every part says so, none runs
    log = (tmp_path / "b" / "gpu-check.log").read_text()
    assert log.count("not run,") == 7 and not list((tmp_path / "b").glob("*.json"))
    r = run("c", "env", "bench-fp32", GPU_CHECK_BENCH="--net no-such-net")  # a failing part: exit 1, the rest ran
    log = (tmp_path / "c" / "gpu-check.log").read_text()
    assert r.returncode == 1 and "== bench-fp32: rc=2" in log and "failed: bench-fp32" in log and "== env: rc=0" in log
    r = run("d", "bench-fp33")
    assert r.returncode == 2 and "unknown part 'bench-fp33'" in r.stderr and not (tmp_path / "d").exists()
