"""`python -m tcmlab.bench`: the JSON record of a tiny run (fields, ratios to stage 1, the command line)."""

import json
import tempfile

import pytest

from tcmlab import bench, speedups

TINY = ["--net", "mlp", "--batch", "8", "--rounds", "2", "--per-round", "1"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "rec.json"
    returned = bench.main(TINY + ["--json", str(path)])
    return returned, json.loads(path.read_text())


def test_record_is_written_and_returned(record):
    returned, rec = record
    assert rec == json.loads(json.dumps(returned))
    for key in ("command", "device", "torch", "net", "batch", "precision", "memory_method", "variants", "reference",
                "routed_over_full", "target", "threads"):
        assert key in rec, key
    assert rec["command"] == "python -m tcmlab.bench " + " ".join(TINY + ["--json", rec["argv"][-1]])
    assert rec["net"] == "mlp" and rec["batch"] == 8 and rec["reference"] == "stage1 (ECT)"
    assert set(rec["variants"]) == {"stage0 (EDM)", "stage1 (ECT)", "stage2 routed", "stage2 full (official)"}


def test_ratios_are_to_stage_1(record):
    _, rec = record
    v = rec["variants"]
    ref = v["stage1 (ECT)"]
    assert ref["time_ratio_to_ref"] == 1.0 and ref["memory_ratio_to_ref"] == 1.0
    for name, row in v.items():
        assert len(row["ms_per_round"]) == 2 and row["ms_per_step"] > 0 and row["peak_mib"] > 0
        assert row["time_ratio_to_ref"] == pytest.approx(row["ms_per_step"] / ref["ms_per_step"], rel=1e-12)
        assert row["memory_ratio_to_ref"] == pytest.approx(row["peak_mib"] / ref["peak_mib"], rel=1e-12)
        assert row["memory_ratio_to_ref_without_theta0"] == pytest.approx(
            row["peak_mib_without_theta0"] / ref["peak_mib_without_theta0"], rel=1e-12)
        paired = sorted(a / b for a, b in zip(row["ms_per_round"], ref["ms_per_round"]))
        assert row["time_ratio_to_ref_paired"] == pytest.approx(sum(paired) / 2, rel=1e-9)
    routed, full = v["stage2 routed"], v["stage2 full (official)"]
    assert rec["routed_over_full"]["time"] == pytest.approx(routed["ms_per_step"] / full["ms_per_step"])
    assert rec["target"]["met_time"] == (routed["time_ratio_to_ref"] <= 1.05)


def test_theta0_is_counted_for_stage_2_only(record):
    _, rec = record
    v = rec["variants"]
    theta0 = v["stage2 routed"]["peak_mib"] - v["stage2 routed"]["peak_mib_without_theta0"]
    assert theta0 > 0  # θ0's weights
    assert v["stage2 full (official)"]["peak_mib"] - v["stage2 full (official)"]["peak_mib_without_theta0"] == \
        pytest.approx(theta0)
    for name in ("stage0 (EDM)", "stage1 (ECT)"):
        assert v[name]["peak_mib"] == v[name]["peak_mib_without_theta0"]


def test_step_samples_times_inside_the_timed_step(monkeypatch):
    calls = []
    stage = bench.STAGES["stage2 routed"]
    original = type(stage).sample_times
    monkeypatch.setattr(type(stage), "sample_times", lambda self, b, g: calls.append(b) or original(self, b, g))
    steps = bench.make_steps("mlp", 4, bench.torch.device("cpu"), names=("stage2 routed",))
    times = bench.time_steps(steps, rounds=2, per_round=3, device=bench.torch.device("cpu"), warmup=1)
    assert len(times["stage2 routed"]) == 2 and calls == [4] * (1 + 2 * 3)


def test_rounds_alternate_the_order_of_the_variants():
    order = []
    steps = {k: (lambda k=k: order.append(k), None) for k in "abc"}
    times = bench.time_steps(steps, rounds=3, per_round=1, device=bench.torch.device("cpu"), warmup=0)
    assert order == list("abccbaabc") and all(len(v) == 3 for v in times.values())


def test_cpu_step_rise_counts_the_largest_live_allocation():
    import torch

    def fn():
        a = torch.ones(1024, 256)  # 1 MiB
        b = torch.ones(1024, 256)  # 2 MiB live
        del a, b
        torch.ones(1024, 128)  # 0.5 MiB, after the peak

    assert bench.cpu_step_rise(fn) == pytest.approx(2 * 2**20, rel=0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])


def test_compare_recipes_reports_the_fast_recipe_over_fp32(tmp_path, monkeypatch):
    # torch.compile is replaced by the identity here (compiling takes minutes on a CPU); the record's arithmetic
    # and the recipes (fp32 contiguous, tf32, bf16 + channels_last + compile) are what is checked.
    compiled = []
    monkeypatch.setattr(bench.torch, "compile", lambda m: compiled.append(m) or m)
    path = tmp_path / "recipes.json"
    rec = bench.main(["--compare-recipes", "--batch", "4", "--rounds", "1", "--per-round", "1", "--no-memory",
                      "--json", str(path)])
    assert json.loads(path.read_text())["recipe_speedup"] == rec["recipe_speedup"]
    v = rec["variants"]
    assert set(v) == {"stage1 fp32", "stage1 tf32", "stage1 bf16+channels_last+compile"}
    assert rec["reference"] == "stage1 fp32"
    assert rec["recipe_speedup"] == pytest.approx(v["stage1 fp32"]["ms_per_step"]
                                                  / v["stage1 bf16+channels_last+compile"]["ms_per_step"])
    assert rec["tf32_speedup"] == pytest.approx(v["stage1 fp32"]["ms_per_step"] / v["stage1 tf32"]["ms_per_step"])
    assert rec["target"] == {"recipe_speedup": 1.3, "met": rec["recipe_speedup"] >= 1.3}
    assert len(compiled) == 2 and all(m.autocast_dtype == bench.torch.bfloat16 for m in compiled)
    assert set(rec["compile_stats"]) == {"stats", "graph_breaks", "recompile_limit_hit"}


def test_steps_run_under_train_s_float32_flags(monkeypatch):
    # the official fp32 recipe has TF32 off; torch's default would leave cuDNN convolutions in TF32
    from tcmlab.precision import math_flags
    monkeypatch.setattr(bench.torch.backends.cudnn, "allow_tf32", True)
    seen = {}

    class Spy:
        def __init__(self, precision):
            self.precision = precision

        def sample_times(self, batch, generator):
            return bench.torch.ones(batch), None

        def loss(self, f, x, *args, **kw):
            seen[self.precision] = math_flags()
            return type("Out", (), {"loss": f(x, bench.torch.ones(x.shape[0])).sum()})

    steps = {p: bench.make_steps("mlp", 2, bench.torch.device("cpu"), precision=p, names=(bench.REF,))[bench.REF]
             for p in ("fp32", "tf32")}
    for p, (_, state) in steps.items():
        bench.train_step(Spy(p), state["f"], state["f0"], state["opt"], state["x"], state["eps"],
                         bench.torch.Generator(), p)
    assert seen == {p: {"matmul_tf32": p == "tf32", "cudnn_tf32": p == "tf32",
                        "fp16_reduced_reduction": p == "tf32", "cudnn_benchmark": True}
                    for p in ("fp32", "tf32")}
    calls = []
    monkeypatch.setattr(bench, "train_step", lambda *a: calls.append(a[-1]))
    for p, (fn, _) in steps.items():
        fn()
    assert calls == ["fp32", "tf32"]  # each variant's step passes its own precision
    assert bench.torch.backends.cudnn.allow_tf32  # restored after every step


def test_compiled_runs_may_recompile_past_torch_s_default_limit():
    # torch's config modules are patched with their own `patch` (pytest's monkeypatch would delete the entry on undo)
    from torch._inductor import config as inductor_config
    cfg = bench.torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    for start, inside in ((8, speedups.RECOMPILE_LIMIT), (1000, 1000)):  # raised, never lowered
        with cfg.patch(**{name: start}), inductor_config.patch(fallback_random=False):
            with speedups.compile_settings():
                assert getattr(cfg, name) == inside and inductor_config.fallback_random
            assert getattr(cfg, name) == start and not inductor_config.fallback_random  # restored
    # the record counts a function that hit the limit (from then on it runs eagerly: the timing would be eager's)
    from torch._dynamo.utils import counters
    counters.clear()
    with cfg.patch(**{name: 1}):
        double = bench.torch.compile(lambda x: x * 2, backend="eager")
        for shape in ((2,), (3, 3), (4, 4, 4)):
            double(bench.torch.ones(shape))
    assert speedups.compile_stats()["recompile_limit_hit"] == 1
    counters.clear()


def test_compare_foreach_times_train_s_optimiser_against_the_loop(tmp_path):
    rec = bench.main(["--compare-foreach", "--batch", "4", "--rounds", "1", "--per-round", "1", "--no-memory",
                      "--json", str(tmp_path / "foreach.json")])
    v = rec["variants"]
    assert set(v) == {"stage1 RAdam loop", "stage1 RAdam foreach"} and rec["reference"] == "stage1 RAdam loop"
    assert rec["foreach_speedup"] == pytest.approx(v["stage1 RAdam loop"]["ms_per_step"]
                                                   / v["stage1 RAdam foreach"]["ms_per_step"])
    steps = bench.make_foreach_steps("mlp", 4, bench.torch.device("cpu"))
    assert [s["opt"].defaults["foreach"] for _, s in steps.values()] == [False, True]
    with pytest.raises(SystemExit, match="separate runs"):
        bench.main(["--compare-foreach", "--compare-recipes"])


def test_performance_doc_names_every_key_of_the_record(record):
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    section = doc.split("## The JSON record", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_0-9]+)`", section))
    _, rec = record
    keys = set(rec) | {k for row in rec["variants"].values() for k in row} | set(rec["target"]) | \
        set(rec["routed_over_full"]) | {"recipe_speedup", "foreach_speedup", "met", "profile", "op", "ms_per_step",
                                        "share", "calls_per_step"}
    assert keys <= named, sorted(keys - named)


def test_a_json_path_that_cannot_be_written_is_refused_before_any_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_steps", lambda *a, **k: pytest.fail("timed before checking --json"))
    with pytest.raises(SystemExit, match="the folder .*nowhere does not exist"):
        bench.main(["--net", "mlp", "--json", str(tmp_path / "nowhere" / "b.json")])
    with pytest.raises(SystemExit, match="a folder; give a file name"):
        bench.main(["--net", "mlp", "--json", str(tmp_path)])
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    with pytest.raises(SystemExit, match="cannot write in .* \\(Permission denied\\); give another path"):
        bench.main(["--net", "mlp", "--json", str(tmp_path / "b.json")])


def test_a_device_that_is_not_there_is_refused_before_any_timing(monkeypatch):
    monkeypatch.setattr(bench, "time_steps", lambda *a, **k: pytest.fail("timed before checking --device"))
    with pytest.raises(SystemExit, match="--device foo: .*e.g. cpu, cuda"):
        bench.main(["--device", "foo"])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: this torch .* sees no CUDA device"):
        bench.main(["--device", "cuda"])


def test_cuda_timing_waits_on_the_benchmarked_device(monkeypatch):
    seen = []
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda device=None: seen.append(device))
    bench.sync_fn(bench.torch.device("cuda", 1))()
    assert seen == [bench.torch.device("cuda", 1)]  # not the current device (cuda:0)
