import json
import subprocess
import sys
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks"
PAPERMILL = [sys.executable, "-m", "papermill"]


def test_notebooks_are_committed_stripped_with_a_parameters_cell():
    for path in sorted(NB.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] is None and not c["outputs"] for c in code), path.name
        assert "parameters" in code[0]["metadata"].get("tags", []), path.name
        assert 'preset = "ci"' in "".join(code[0]["source"]), path.name


def run_card(tmp_path, *params):
    env = {**__import__("os").environ, "TCMLAB_NB_OUT": str(tmp_path / "runs")}
    return subprocess.run(PAPERMILL + ["02_truncated_training.ipynb", str(tmp_path / "out.ipynb"), *params,
                                       "--no-progress-bar"], cwd=NB, env=env, capture_output=True, text=True)


def test_card_command_works_verbatim_with_an_int_tprime(tmp_path):
    r = run_card(tmp_path, "-p", "tprime", "1")  # papermill passes `-p tprime 1` as an int
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out.ipynb").read_text())
    text = json.dumps(out)
    assert "no stage-1 run given or found" in text  # standalone on a fresh checkout: trained the small stage 1
    assert (tmp_path / "runs" / "stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01" / "samples_2step.png").exists()


def test_card_command_rejects_tprime_out_of_range(tmp_path):
    r = run_card(tmp_path, "-p", "tprime", "200")
    assert r.returncode != 0
    assert "tprime (loss.t_prime) must be in (0, T=80), got 200" in r.stderr + r.stdout


def test_boolean_parameters_are_parsed_strictly():
    from tcmlab import nbparams
    assert nbparams.as_bool("teacher_dropout", "false") is False  # bool("false") would be True
    assert nbparams.as_bool("teacher_dropout", "True") is True and nbparams.as_bool("x", 0) is False
    for bad in ("maybe", 2, None, 0.5):
        with pytest.raises(ValueError, match="teacher_dropout must be true or false"):
            nbparams.as_bool("teacher_dropout", bad)
    cfg = nbparams.stage2_config("ci", "runs/s1", 1, 0.1, 0.25, 0.2, 0.01, teacher_dropout="false")
    assert cfg.loss.teacher_dropout is False


def test_explorer_plots_the_dirac_mass_from_w_b_not_rho():
    # TCM Eq. (7)/(10): λ_b = w_b/(1 + w_b); ρ is the batch share at t′, not the mass.
    from tcmlab import plots
    fig = plots.psi_figure(1.0, 0.2, 0.01, rho=0.25, w_b=0.1)
    spike = fig.data[2]
    assert max(spike.y) == pytest.approx(0.1 / 1.1) and "ρ = 0.25" in spike.name
    assert max(plots.psi_figure(1.0, 0.2, 0.01, rho=0.5, w_b=1.0).data[2].y) == pytest.approx(0.5)
    assert max(plots.psi_figure(1.0, 0.2, 0.01, rho=0.1, w_b=1.0).data[2].y) == pytest.approx(0.5)


def test_code_cites_decisions_that_exist():
    import re
    root = Path(__file__).resolve().parents[1]
    decisions = (root / "docs" / "decisions.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", decisions, re.M))
    files = [p for p in (root / "tcmlab").rglob("*.py")] + list((root / "tests").glob("*.py"))
    for path in files:
        text = path.read_text()
        if path.name != "test_notebooks.py":
            assert "SPEC" not in text and "reference-code.md" not in text, f"{path} cites a document outside the repo"
        for cited in re.findall(r"decisions(?:\.md)? (§[\d–, §]+)", text):
            for n in re.findall(r"\d+", cited):
                assert n in sections, f"{path} cites docs/decisions.md §{n}, which does not exist"
