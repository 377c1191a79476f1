import pickle

import numpy as np
import pytest
import torch

from tcmlab.config import DataConfig
from tcmlab.data import cifar10, digits, load_data, toy2d


def test_digits_is_the_embedded_default():
    d = digits()
    assert len(d) == 1797 and d.shape == (1, 8, 8)
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    assert load_data(DataConfig()).name == "digits"


@pytest.mark.parametrize("name", ["moons", "gaussians8"])
def test_toy2d(name):
    d = toy2d(name, n=1000)
    assert d.shape == (2,) and torch.allclose(d.x.std(0), torch.full((2,), 0.5), atol=0.01)


def write_cifar(root, n=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [0] * n}, fh)
    return folder


def test_cifar10_from_python_batches(tmp_path):
    write_cifar(tmp_path)
    d = cifar10(tmp_path)
    assert len(d) == 50 and d.shape == (3, 32, 32) and d.x.dtype == torch.uint8
    x = d.get(torch.tensor([0, 1]))
    assert x.dtype == torch.float32 and float(x.min()) >= -1 and float(x.max()) <= 1
    assert load_data(DataConfig(name="cifar10", root=str(tmp_path))).shape == (3, 32, 32)


def test_cifar10_missing_or_damaged_gives_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        cifar10(tmp_path / "nowhere")
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        cifar10(tmp_path)


def test_crafted_cifar_batch_never_executes(tmp_path):
    from tests.test_metrics import Marker
    write_cifar(tmp_path, n=4)
    marker = tmp_path / "EXECUTED"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Marker(marker), b"labels": [0]}, fh)
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 python batch.*refused"):
        cifar10(tmp_path)
    assert not marker.exists()


def test_cifar_batch_in_the_official_format_loads(tmp_path):
    # The official batches are Python-2 pickles (protocol 2) of {b'batch_label', b'labels', b'data', b'filenames'}.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        batch = {b"batch_label": b"training batch", b"labels": [1, 2], b"filenames": [b"a.png", b"b.png"],
                 b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    d = cifar10(tmp_path)
    assert d.x.shape == (10, 3, 32, 32) and d.x.dtype == torch.uint8
