"""EDM's official pickle format, imported without executing the source it embeds.

The test writes a pickle the way NVlabs/edm's `torch_utils.persistence` does (every persistent object reduced to
`_reconstruct_persistent_obj(meta)` with `meta['module_src']` = the module's source, `meta['state']` = its
`__dict__`; nn.ModuleDict pickled normally), with a source that would create a marker file if executed."""

import dataclasses
import io
import pickle
import re
import sys
import types

import pytest
import torch
from torch import nn

from tcmlab.config import NetConfig, preset
from tcmlab.edm_import import load_edm_pickle
from tcmlab.model import build_model, load_state
from tcmlab.nets import build_net
from tcmlab.train import train

NET = NetConfig(arch="ddpmpp", channels=16, channel_mult=(1, 2), depth=1, attn_resolutions=(4,), dropout=0.1)


def fake_persistence(marker):
    """A stand-in for EDM's `torch_utils.persistence` whose loader executes module_src, as EDM's does."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})
        raise AssertionError("EDM's loader would have executed the embedded source")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    return {"torch_utils": pkg, "torch_utils.persistence": mod}, f"open({str(marker)!r}, 'w').write('executed')\n"


class EDMPrecond(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.sigma_data = 0.5
        self._init_kwargs = {"img_resolution": 8, "model_channels": 16}


class EDMLoss:  # a persistent non-module object, as EDM's loss_fn
    pass


class NotATensor:
    pass


class VPPrecond(EDMPrecond):  # EDM's baseline-*-vp.pkl: the same SongUNet tensors under VP scalings
    pass


def write_edm_pickle(path, net, marker, monkeypatch, extra=None, wrapper=EDMPrecond, init_kwargs=None):
    modules, src = fake_persistence(marker)
    for name, m in modules.items():
        monkeypatch.setitem(sys.modules, name, m)
    persist = modules["torch_utils.persistence"]._reconstruct_persistent_obj

    class EDMStylePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, (nn.Module, EDMLoss)) and not isinstance(obj, nn.ModuleDict):
                meta = dict(type="class", version=6, module_src=src, class_name=type(obj).__name__,
                            state=dict(obj.__dict__))
                return persist, (meta,)
            return NotImplemented

    net.map_augment = nn.Linear(9, 16, bias=False)  # EDM's augmentation-label layer (augment_dim 9): dropped
    ema = wrapper(net).eval().requires_grad_(False)
    if init_kwargs is not None:
        ema._init_kwargs = init_kwargs
    data = dict(ema=ema, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip"),
                **(extra or {}))
    with open(path, "wb") as fh:
        EDMStylePickler(fh, protocol=4).dump(data)


def test_edm_pickle_imports_by_name_without_executing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build_net(NET, (1, 8, 8))
    expected = {"net." + k: v.clone() for k, v in net.state_dict().items()}
    marker = tmp_path / "EXECUTED"
    write_edm_pickle(tmp_path / "edm.pkl", net, marker, monkeypatch)
    state, kwargs = load_edm_pickle(tmp_path / "edm.pkl")  # EDM's (fake) code is importable, as on a user's machine
    assert not marker.exists()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert kwargs == {"img_resolution": 8, "model_channels": 16}
    assert not any("map_augment" in k for k in state)


def test_another_preconditioner_or_other_recorded_kwargs_are_refused(tmp_path, monkeypatch):
    net = build_net(NET, (1, 8, 8))
    write_edm_pickle(tmp_path / "vp.pkl", net, tmp_path / "EXECUTED", monkeypatch, wrapper=VPPrecond)
    with pytest.raises(ValueError, match="is a VPPrecond, not EDMPrecond"):
        load_edm_pickle(tmp_path / "vp.pkl")
    edm_config = {"model_type": "SongUNet", "embedding_type": "positional", "resample_filter": [1, 1],
                  "channel_mult_noise": 1, "model_channels": 16}
    write_edm_pickle(tmp_path / "ok.pkl", net, tmp_path / "EXECUTED", monkeypatch, init_kwargs=edm_config)
    assert load_edm_pickle(tmp_path / "ok.pkl")[1] == edm_config
    for bad in ({"embedding_type": "fourier"}, {"resample_filter": [1, 3, 3, 1]}, {"label_dim": 10}):
        write_edm_pickle(tmp_path / "bad.pkl", net, tmp_path / "EXECUTED", monkeypatch,
                         init_kwargs={**edm_config, **bad})
        with pytest.raises(ValueError, match=re.escape(f"built with {bad}")):
            load_edm_pickle(tmp_path / "bad.pkl")
    write_edm_pickle(tmp_path / "odd.pkl", net, tmp_path / "EXECUTED", monkeypatch, init_kwargs=[1, 2])
    with pytest.raises(ValueError, match="not a usable EDM checkpoint.*not a dict"):
        load_edm_pickle(tmp_path / "odd.pkl")
    assert not (tmp_path / "EXECUTED").exists()


def test_a_tensor_record_with_objects_is_refused_without_suggesting_to_run_it(tmp_path):
    from tcmlab import edm_import
    blob = io.BytesIO()
    torch.save({"x": torch.zeros(1), "f": NotATensor()}, blob)  # not weights_only-loadable
    with pytest.raises(pickle.UnpicklingError, match="objects other than tensors") as e:
        edm_import._load_from_bytes(blob.getvalue())
    assert "weights_only" not in str(e.value)


def test_foreign_globals_are_refused(tmp_path):
    marker = tmp_path / "EXECUTED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(ValueError, match="refused io.open.*Nothing in it was executed"):
        load_edm_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "trunc.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a usable EDM checkpoint"):
        load_edm_pickle(tmp_path / "trunc.pkl")


def test_stage1_starts_from_an_edm_pickle_and_refuses_a_mismatch(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build_net(NET, (1, 8, 8))
    expected = {"net." + k: v.clone() for k, v in net.state_dict().items()}
    write_edm_pickle(tmp_path / "edm.pkl", net, tmp_path / "EXECUTED", monkeypatch)
    cfg = dataclasses.replace(preset("ci", 1, init_from=str(tmp_path / "edm.pkl")), net=NET)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1, lr=1e-12))
    train(cfg, tmp_path / "s1", progress=False)
    state = load_state(tmp_path / "s1")[0]
    assert state["init_source"]["path"].endswith("edm.pkl") and state["init_source"]["step"] == 0
    assert all(torch.allclose(state["model"][k], expected[k], atol=1e-6) for k in expected)  # lr ≈ 0: unchanged
    other = dataclasses.replace(cfg, net=dataclasses.replace(NET, channels=8))
    with pytest.raises(ValueError, match="does not fit this network"):
        train(other, tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="stage 1 only"):
        train(preset("ci", 2, init_from=str(tmp_path / "edm.pkl")), tmp_path / "bad2", progress=False)


def test_cifar10_stage1_needs_init_from_or_from_scratch(tmp_path):
    cfg = preset("cifar10", 1)
    with pytest.raises(ValueError, match="edm-cifar10-32x32-uncond-vp.pkl.*from_scratch"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    ok = dataclasses.replace(cfg, from_scratch=True)  # accepted: it now fails only on the missing data
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        train(ok, tmp_path / "r", progress=False)
    assert build_model(preset("ci", 1), (1, 8, 8)) is not None
