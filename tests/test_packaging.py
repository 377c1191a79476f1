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
