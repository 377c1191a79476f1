import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def ci_runs(tmp_path_factory):
    """Stage 0 -> 1 -> 2 of the `ci` preset, trained once per test session."""
    from tcmlab.config import preset
    from tcmlab.train import train

    root = tmp_path_factory.mktemp("ci_runs")
    train(preset("ci", 0), root / "s0", progress=False)
    train(preset("ci", 1, init_from=str(root / "s0")), root / "s1", progress=False)
    train(preset("ci", 2, init_from=str(root / "s1")), root / "s2", progress=False)
    return root


@pytest.fixture
def nan_loss(monkeypatch):
    """poison(name): tcmlab.stages' loss `name` (edm_loss, ect_loss, tcm_loss) returns a NaN loss from then on;
    heal(name) puts the real one back (the test's end does too)."""
    import tcmlab.stages as stages

    real = {}

    def poison(name: str) -> None:
        fn = real.setdefault(name, getattr(stages, name))

        def poisoned(*a, **k):
            out = fn(*a, **k)
            out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(stages, name, poisoned)

    def heal(name: str) -> None:
        monkeypatch.setattr(stages, name, real[name])

    return poison, heal
