"""Import EDM's official CIFAR-10 checkpoint (`edm-cifar10-32x32-uncond-vp.pkl`) without executing its code.

The file is a plain pickle of `dict(ema=EDMPrecond(SongUNet), loss_fn, augment_pipe, dataset_kwargs)` written with
NVlabs/edm's `torch_utils.persistence`: every persistent object is stored as
`_reconstruct_persistent_obj(meta)`, where `meta` carries the full source of its module (`module_src`, which a
normal load `exec`s) and the object's `__dict__` (`state`). `load_edm_pickle` reads it with an unpickler that admits
only the globals such a file holds, maps the persistent-object call to one that keeps `class_name` and `state` and
never looks at `module_src`, and rebuilds the EMA network's state dict from the `_parameters`/`_buffers`/`_modules`
tree. Tensor storages are read with `torch.load(..., weights_only=True)`. Any other global is an error, and so is
a network that is not an `EDMPrecond` built as our `Precond(SongUNet)` (`check_edm_kwargs`).

Names map `model.*` → `net.*` (our `Precond` wraps the same `SongUNet` layout); `model.map_augment.weight` (EDM's
augmentation-label layer, augment_dim = 9) is dropped, as the official ECT/TCM code drops it by building the
network without augmentation.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch


class _Node:
    """What a persistent object or a torch container becomes: its class name and its `__dict__` state, inert."""

    class_name = "ModuleDict"  # NEWOBJ (nn.ModuleDict) creates the object without calling __init__
    state: dict = {}

    def __init__(self, class_name: str = "ModuleDict", state: dict | None = None):
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state):  # BUILD of a NEWOBJ-created container (nn.ModuleDict)
        self.state = state if isinstance(state, dict) else {}


class _ModuleDict(_Node):
    """nn.ModuleDict (`enc`, `dec`): not persistent, pickled as NEWOBJ + BUILD."""


class _Inert:
    """numpy scalars and dtypes in plain attributes (e.g. `skip_scale = np.sqrt(0.5)`): kept as nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("unexpected persistent-object record (not an EDM `persistence` class)")
    return _Node(str(meta.get("class_name")), meta["state"])  # meta['module_src'] is never read


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    return data


def _load_from_bytes(b: bytes):
    try:
        return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, i.e. running the file's code
        raise pickle.UnpicklingError("a tensor record holds objects other than tensors") from None


class _EDMUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("numpy.core.multiarray", "scalar"): _Inert,
        ("numpy._core.multiarray", "scalar"): _Inert,
        ("numpy", "dtype"): _Inert,
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused {module}.{name}: an EDM checkpoint holds only network state")


def _state_dict(node: _Node, prefix: str = "") -> dict[str, torch.Tensor]:
    """nn.Module.state_dict() rebuilt from the `__dict__` tree: parameters, persistent buffers, then children."""
    out = {}
    s = node.state
    skip = set(s.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, v in (s.get(kind) or {}).items():
            if v is not None and name not in skip:
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = v
    for name, child in (s.get("_modules") or {}).items():
        if child is not None:
            if not isinstance(child, _Node):
                raise ValueError(f"{prefix}{name} is not a module record")
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


DROPPED = ("model.map_augment.weight", "model.map_augment.bias")
# EDMPrecond's recorded constructor arguments that our Precond(SongUNet) hard-wires (NVlabs/edm training/networks.py
# defaults and the edm-cifar10-32x32-uncond-vp.pkl config); checked where the file records them. Sizes (channels,
# multipliers, blocks, attention) are checked by name and shape in `check_against`.
EXPECTED_KWARGS = {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
                   "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1], "label_dim": 0,
                   "sigma_data": 0.5}


def check_edm_kwargs(class_name: str, kwargs: dict, path) -> None:
    """Refuse a network that is not EDMPrecond(SongUNet DDPM++) as our Precond computes it: another preconditioner
    (EDM's baseline VPPrecond / VEPrecond pickles hold the same SongUNet tensors under other scalings) or recorded
    constructor arguments that differ from EXPECTED_KWARGS."""
    if class_name != "EDMPrecond":
        raise ValueError(f"{path}: its network is a {class_name}, not EDMPrecond: its weights were trained under "
                         f"other scalings than tcmlab's EDM c_skip/c_out/c_in/c_noise (TCM Eq. 3). Use EDM's "
                         f"edm-cifar10-32x32-uncond-vp.pkl, not a baseline-*.pkl")
    odd = {k: kwargs[k] for k, v in EXPECTED_KWARGS.items()
           if k in kwargs and (list(kwargs[k]) if isinstance(kwargs[k], (list, tuple)) else kwargs[k]) != v}
    if odd:
        raise ValueError(f"{path}: its EDMPrecond was built with {odd}, where tcmlab's network has "
                         f"{ {k: EXPECTED_KWARGS[k] for k in odd} }; it cannot be imported exactly")


def load_edm_pickle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict for our `Precond(SongUNet)`, the EMA network's recorded constructor kwargs) of an EDM pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM checkpoint {path} does not exist: download edm-cifar10-32x32-uncond-vp.pkl "
                                f"(NVlabs/edm) on a machine with internet and copy it there")
    try:
        with open(path, "rb") as fh:
            data = _EDMUnpickler(fh).load()
        ema = data["ema"]
        if not isinstance(ema, _Node):
            raise ValueError("its 'ema' entry is not a persistent network")
        sd = _state_dict(ema)
        kwargs = ema.state.get("_init_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError("its network's recorded constructor arguments are not a dict")
    except (pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a usable EDM checkpoint ({e}). Nothing in it was executed. Use the "
                         f"official edm-cifar10-32x32-uncond-vp.pkl, or a tcmlab run as init_from.") from None
    odd = [k for k in sd if not k.startswith("model.")]
    if odd:
        raise ValueError(f"{path}: unexpected tensors outside the network ({odd[:3]}); not an EDMPrecond pickle")
    check_edm_kwargs(ema.class_name, kwargs, path)
    return {"net." + k[len("model."):]: v for k, v in sd.items() if k not in DROPPED}, dict(kwargs)


def check_against(state: dict[str, torch.Tensor], model: torch.nn.Module, path) -> None:
    """Refuse an imported state that does not fit `model` exactly (names and shapes), saying what differs."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} vs ours {tuple(v.shape)}" for k, v in ours.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise ValueError(f"{path} does not fit this network (net config must be EDM's DDPM++: channels 128, "
                         f"channel_mult (2, 2, 2), depth 4, attn (16,)). Missing: {missing[:3]}, unexpected: "
                         f"{extra[:3]}, shape mismatches: {shapes[:3]}")
