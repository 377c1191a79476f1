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
