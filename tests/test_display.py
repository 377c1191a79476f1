"""Saved-output pieces of the notebooks: run_stage's progress lines and the picture panels."""

import torch

from tcmlab import plots
from tcmlab.config import preset
from tcmlab.launch import run_stage


def test_run_stage_says_what_it_did_and_ends_each_call_with_its_own_final_line(tmp_path, capsys):
    cfg = preset("ci", 0)  # 20 steps; a folder named "reused" must not be mistaken for a finished run
    run = tmp_path / "reused"
    assert run_stage(cfg, run, steps=5).startswith(f"training {run} from step 0 to 20")
    out = capsys.readouterr().out.strip().splitlines()
    assert "(this call: to step 5 of 20)" in out[-1] and "step 5/5 (100%)" in out[-1] and out[-1].endswith("done")
    assert run_stage(cfg, run) == f"found {run} at step 5: resuming to 20"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "step 20/20 (100%)" in last and "this call" not in last and last.endswith("done")
    assert run_stage(cfg, run) == f"found {run} at step 20: reused, not retrained"
    assert "step" not in capsys.readouterr().out.replace("at step 20", "")  # no progress line: nothing trained


def test_picture_panels_take_images_and_points_with_one_title_per_column_and_row():
    g = torch.Generator().manual_seed(0)
    rows = {"images": {"a": torch.rand(9, 1, 8, 8, generator=g) * 2 - 1, "b": torch.rand(9, 1, 8, 8, generator=g)},
            "points": {"a": torch.randn(50, 2, generator=g), "b": torch.randn(50, 2, generator=g)}}
    fig = plots.picture_panels(rows, "panels")
    assert [tr.type for tr in fig.data] == ["image", "image", "scatter", "scatter"]
    assert fig.data[0].z.shape == (3 * 8 + 4, 3 * 8 + 4, 3)  # 3×3 grid of 8×8 images, 1-pixel padding, RGB
    assert [a.text for a in fig.layout.annotations] == ["a", "b"]  # column titles, once
    assert fig.layout.yaxis.title.text == "images" and fig.layout.yaxis3.title.text == "points"
    assert fig.layout.width >= 820


def test_run_stage_warns_when_stage1_moved_on_under_a_finished_stage2(tmp_path, ci_runs, capsys):
    # a stage-2 run keeps θ0; if stage 1 is trained on afterwards, reusing stage 2 compares it with another stage 1
    import dataclasses
    import shutil

    import pytest
    shutil.copytree(ci_runs / "s1", tmp_path / "s1")
    cfg2 = preset("ci", 2, init_from=str(tmp_path / "s1"))
    cfg2 = dataclasses.replace(cfg2, train=dataclasses.replace(cfg2.train, steps=2))
    run_stage(cfg2, tmp_path / "s2", progress=False)
    run_stage(cfg2, tmp_path / "s2", progress=False)
    assert "WARNING" not in capsys.readouterr().out  # same stage 1: paired
    cfg1 = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg1 = dataclasses.replace(cfg1, train=dataclasses.replace(cfg1.train, steps=cfg1.train.steps + 2))
    run_stage(cfg1, tmp_path / "s1", progress=False)  # stage 1 trained on
    with pytest.warns(UserWarning, match="not paired with the current stage 1"):
        assert run_stage(cfg2, tmp_path / "s2", progress=False).endswith("reused, not retrained")
    assert "[tcmlab] WARNING:" in capsys.readouterr().out


def test_curriculum_plot_starts_at_the_runs_step_offset():
    from tcmlab.schedules import ect_ratio
    fig = plots.curriculum(2.0, 10, 0.99, 20, step_offset=35)  # a stage 1 that continues a curriculum at i = 35
    assert fig.data[0].x[0] == 35 and fig.data[0].x[-1] == 55
    assert fig.data[0].y[0] == ect_ratio(35, 2.0, 10, 0.99) != ect_ratio(0, 2.0, 10, 0.99)
