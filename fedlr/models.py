"""Small networks for the offline datasets, with BatchNorm-free variants for DP.

``norm`` selects the normalisation of the CNNs: ``"none"``, ``"group"``
(GroupNorm; per-sample, so Opacus accepts it) or ``"batch"`` (BatchNorm; mixes
samples within a batch, which per-sample DP-SGD cannot allow).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedlr.config import Config


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
    return nn.Identity()


class MLP(nn.Module):
    """Two hidden ReLU layers: the FedMUD spec's MLP 40-256-256-10 on MNIST-1D."""

    def __init__(self, in_features: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear head, in the spirit of the
    MNIST-1D paper's CNN (Greydanus & Kobak, 2020), for inputs (N, 1, 40)."""

    def __init__(self, length: int, num_classes: int, norm: str = "none", channels: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for stride in (1, 2, 2):
            layers += [nn.Conv1d(c_in, channels, 5, stride=stride, padding=2), _norm(norm, channels, 1), nn.ReLU()]
            c_in = channels
        self.features = nn.Sequential(*layers)
        out_len = length
        for stride in (1, 2, 2):
            out_len = (out_len + 2 * 2 - 5) // stride + 1
        self.head = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class CNN(nn.Module):
    """Two 3x3 convolutions, pooling to 4x4 and a 2-layer head: a small image CNN."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "none", width: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), _norm(norm, 32, 2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), _norm(norm, 64, 2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Linear(64 * 16, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class CNN4(nn.Module):
    """The 4-conv CNN of the FedMUD experiments (Li et al., ICML 2025, official
    code ``model/cnn.py``): conv3x3 with 32-64-128-256 channels, each followed by
    normalisation, ReLU and 2x2 max-pooling, then a bias-free linear classifier.

    Pooling rounds up (``ceil_mode``) so that 8x8 digits survive four halvings.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c_out in (32, 64, 128, 256):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out, 2), nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        h, w = input_shape[1:]
        for _ in range(4):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.classifier = nn.Linear(256 * h * w, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network named by ``cfg["model"]``, initialised from ``cfg["seed"]``.

    Initialising under a fixed seed makes the server and every client agree on
    the starting weights without shipping them (FedMUD's frozen base relies on it).
    """
    name, norm = cfg["model"], cfg["norm"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        if name == "mlp":
            return MLP(math.prod(input_shape), cfg["width"], num_classes)
        if name == "cnn1d":
            return CNN1D(input_shape[-1], num_classes, norm)
        if len(input_shape) != 3:
            raise ValueError(f"model = {name!r} needs image inputs (C, H, W), got shape {input_shape}")
        if name == "cnn":
            return CNN(input_shape[0], num_classes, norm, cfg["width"])
        if name == "cnn4":
            return CNN4(input_shape, num_classes, norm)
    raise ValueError(f"unknown model {name!r}")
