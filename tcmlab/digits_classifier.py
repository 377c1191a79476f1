"""A small CNN classifier of the 8×8 digits whose penultimate layer is the feature space of the digits FID.

Inception-v3 features are meaningless on 8×8 grey digits, so FID/KID on the embedded data use this network,
registered with torch-fidelity as `tcmlab-digits-cnn`. Train (deterministic, seconds on a CPU) and ship with:

    python -m tcmlab.digits_classifier          # writes data/digits_cnn.safetensors and data/digits_cnn.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import check_writable, sha256
from .data import digits, digits_labels

WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "digits_cnn.safetensors"
FEATURES = 128


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc0 = nn.Linear(64 * 4 * 4, FEATURES)
        self.fc1 = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of images in [−1, 1], shape [B, 1, 8, 8]."""
        h = F.relu(self.conv1(F.relu(self.conv0(x))))
        h = F.relu(self.conv2(F.max_pool2d(h, 2)))
        return F.relu(self.fc0(h.flatten(1)))

    def forward(self, x):
        return self.fc1(self.features(x))


def split(seed: int = 0):
    """Fixed train/held-out split of the 1,797 digits (80/20)."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return perm[:1437], perm[1437:]


def load(path: Path = WEIGHTS) -> DigitsCNN:
    if not Path(path).is_file():
        raise FileNotFoundError(f"digits feature extractor weights missing at {path}: run "
                                f"`python -m tcmlab.digits_classifier` to train them (seconds on a CPU)")
    net = DigitsCNN()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: DigitsCNN) -> float:
    x, y = digits().x, digits_labels()
    _, test = split()
    return float((net(x[test]).argmax(1) == y[test]).float().mean())


def train_classifier(epochs: int = 30, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    x, y = digits().x, digits_labels()
    tr, _ = split()
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(tr), generator=g).split(64):
            b = tr[idx]
            xb = x[b] + 0.05 * torch.randn(x[b].shape, generator=g)  # light noise for smoother features
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tcmlab.digits_classifier", description=__doc__)
    ap.add_argument("--out", default=str(WEIGHTS), help="where to write the weights (and their card, .md)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing file (the shipped one included)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    card = out.with_suffix(".md")
    there = [path for path in (out, card) if path.exists()]
    if there and not args.force:
        # every digits FID/KID, the floor and every eval card's extractor hash are of this file: keep it unless asked
        ap.error(f"{' and '.join(map(str, there))} exist{'s' if len(there) == 1 else ''} (a retrained network is "
                 f"another extractor: other torch versions and CPUs give other weights, so scores would not "
                 f"compare). Give --out NEW_PATH, or --force to replace {'it' if len(there) == 1 else 'them'}")
    if out.is_dir() or card.is_dir():
        ap.error(f"--out {out}: {out if out.is_dir() else card} is a folder; give a file name")
    try:  # before the training, not after
        out.parent.mkdir(parents=True, exist_ok=True)
        check_writable(out.parent)
    except OSError as e:
        ap.error(f"--out {out}: cannot write in {out.parent} ({e.strerror}); give another path")
    torch.set_num_threads(1)  # deterministic reductions
    net = train_classifier()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    acc = accuracy(load(out))
    card.write_text(
        "# Digits feature extractor (`tcmlab-digits-cnn`)\n\n"
        "Small CNN classifier of sklearn's 8×8 digits; FID/KID on the digits use its 128-d penultimate layer.\n\n"
        "| | |\n|---|---|\n"
        "| training command | `python -m tcmlab.digits_classifier --force` (30 epochs, Adam 2e-3, seed 0, 1 thread) |\n"
        "| split | `tcmlab.digits_classifier.split()`: 1,437 train / 360 held out (randperm, seed 0) |\n"
        f"| held-out accuracy | {acc:.4f} |\n"
        f"| sha256 | `{sha256(out)}` |\n")
    print(f"held-out accuracy {acc:.4f}; wrote {out} and {card}")


if __name__ == "__main__":
    main()
