"""Signal models: `build_signal_model(spec)` for windows (B, L, T) of multi-lead signals.

Registry: "lstm" and "gru" (recurrent, uni/bidirectional, `layers` deep) and "resnet1d" (a ResNet-style 1D CNN:
residual blocks of Conv1d-BN-ReLU, strided downsampling). Every model standardises each window per lead inside
`forward` (mean and standard deviation over time), so inputs in mV (or any unit) train alike:
classify -> logits (B, K); forecast -> (B, L, H), predicted in the standardised units as a change from the last
context sample and mapped back to the input's units (so an untrained head starts near persistence).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from medpipe.task import Task
from medpipe.training import TrainingError, UnknownModelError, as_task

STD_FLOOR = 1e-3  # per-lead standard deviation floor (input units): a flat lead is centred, not blown up
FORECAST_POOL = 16  # resnet1d forecast head: the last feature map pooled to this many steps (keeps their order)


@dataclass(frozen=True)
class SignalModelSpec:
    """Everything that builds a signal model (recorded in checkpoints as `signal_model`)."""

    name: str
    task: str  # "classify" or "forecast"
    leads: int
    num_outputs: int  # classify: classes; forecast: 0
    horizon: int = 0  # forecast: samples predicted per lead
    hidden: int = 64  # lstm/gru: units per layer and direction; resnet1d: width of the first stage
    layers: int = 2  # lstm/gru: stacked layers
    bidirectional: bool = True
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (checkpoint-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SignalModelSpec:
        """The spec a checkpoint recorded."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mean, std): `x` (B, L, T) standardised per window and lead over time; mean/std (B, L, 1)."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(STD_FLOOR)
    return (x - mean) / std, mean, std


class SignalNet(nn.Module, ABC):
    """Shared frame: standardise, encode (subclass), then the task's head. Subclasses set `features`, the width of
    `encode`'s output, and implement `encode(z) -> (B, features)`."""

    def __init__(self, spec: SignalModelSpec, features: int) -> None:
        super().__init__()
        self.spec = spec
        self.task = as_task(spec.task)
        outputs = spec.num_outputs if self.task is Task.classify else spec.leads * spec.horizon
        linear = nn.Linear(features, outputs)
        if self.task is Task.forecast:  # start at persistence: zero change from the last context sample
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(spec.dropout), linear)

    @abstractmethod
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, features) of a standardised batch (B, L, T)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, mean, std = standardise(x.float())
        out = self.head(self.encode(z))
        if self.task is Task.classify:
            return out
        change = out.view(x.shape[0], self.spec.leads, self.spec.horizon)
        return (z[:, :, -1:] + change) * std + mean


class RecurrentNet(SignalNet):
    """LSTM or GRU over time (batch_first). Classify: the last layer's final states (both directions) with the mean
    and max of its outputs over time; forecast: the final states and the outputs of the last steps."""

    TAIL = 8  # forecast: outputs of the last steps fed to the head (the phase of the beat being continued)

    def __init__(self, spec: SignalModelSpec) -> None:
        dirs = 2 if spec.bidirectional else 1
        width = spec.hidden * dirs
        task = as_task(spec.task)
        super().__init__(spec, 3 * width if task is Task.classify else width * (1 + self.TAIL))
        cell = nn.LSTM if spec.name == "lstm" else nn.GRU
        self.rnn = cell(spec.leads, spec.hidden, num_layers=spec.layers, batch_first=True,
                        bidirectional=spec.bidirectional, dropout=spec.dropout if spec.layers > 1 else 0.0)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(z.transpose(1, 2))  # (B, T, dirs * hidden)
        h_n = state[0] if isinstance(state, tuple) else state  # (layers * dirs, B, hidden)
        dirs = 2 if self.spec.bidirectional else 1
        final = h_n[-dirs:].transpose(0, 1).reshape(z.shape[0], -1)
        if self.task is Task.classify:
            return torch.cat([final, out.mean(dim=1), out.amax(dim=1)], dim=1)
        tail = out[:, -self.TAIL:, :]
        if tail.shape[1] < self.TAIL:  # a context shorter than the tail: repeat its first step
            tail = torch.cat([tail[:, :1].expand(-1, self.TAIL - tail.shape[1], -1), tail], dim=1)
        return torch.cat([final, tail.reshape(z.shape[0], -1)], dim=1)


class ResidualBlock1d(nn.Module):
    """Conv1d-BN-ReLU-Conv1d-BN plus the (1x1-projected when the shape changes) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int = 7) -> None:
        super().__init__()
        pad = kernel // 2
        self.body = nn.Sequential(
            nn.Conv1d(cin, cout, kernel, stride=stride, padding=pad, bias=False), nn.BatchNorm1d(cout),
            nn.ReLU(inplace=True), nn.Conv1d(cout, cout, kernel, padding=pad, bias=False), nn.BatchNorm1d(cout))
        self.skip: nn.Module = (nn.Identity() if cin == cout and stride == 1 else
                                nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet1d(SignalNet):
    """Stem conv, then stages of two residual blocks (widths w, 2w, 4w; each later stage halves the time axis).
    Classify: global mean and max pooling; forecast: the last feature map pooled to FORECAST_POOL steps in order
    (where in the context each beat lies is what the continuation depends on) and its global mean."""

    def __init__(self, spec: SignalModelSpec) -> None:
        widths = (spec.hidden // 2, spec.hidden, spec.hidden * 2)
        task = as_task(spec.task)
        last = widths[-1]
        super().__init__(spec, 2 * last if task is Task.classify else last * (FORECAST_POOL + 1))
        layers: list[nn.Module] = [nn.Conv1d(spec.leads, widths[0], 7, stride=1, padding=3, bias=False),
                                   nn.BatchNorm1d(widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for i, width in enumerate(widths):
            layers += [ResidualBlock1d(cin, width, stride=1 if i == 0 else 2), ResidualBlock1d(width, width, 1)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(FORECAST_POOL)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.features(z)  # (B, C, T')
        if self.task is Task.classify:
            return torch.cat([f.mean(dim=2), f.amax(dim=2)], dim=1)
        return torch.cat([self.pool(f).flatten(1), f.mean(dim=2)], dim=1)


# name -> builder; every model does both tasks
SIGNAL_MODELS: dict[str, Callable[[SignalModelSpec], SignalNet]] = {
    "lstm": RecurrentNet, "gru": RecurrentNet, "resnet1d": ResNet1d}
SIGNAL_TASKS = (Task.classify, Task.forecast)


def check_signal_model(name: str, task: Task | str) -> str:
    """`name` when it is a signal model for `task`; UnknownModelError / TrainingError (one line) otherwise."""
    if name not in SIGNAL_MODELS:
        raise UnknownModelError(f"unknown signal model {name!r}; valid names: {', '.join(SIGNAL_MODELS)}")
    if as_task(task) not in SIGNAL_TASKS:
        raise TrainingError(f"signal models do {' or '.join(t.value for t in SIGNAL_TASKS)}, not {as_task(task).value!r}")
    return name


def build_signal_model(spec: SignalModelSpec) -> SignalNet:
    """A fresh model from the registry for `spec`; `medpipe_task` tells predict code what its outputs mean."""
    check_signal_model(spec.name, spec.task)
    if as_task(spec.task) is Task.forecast and spec.horizon < 1:
        raise TrainingError("a forecast model needs a horizon of at least one sample")
    if as_task(spec.task) is Task.classify and spec.num_outputs < 2:
        raise TrainingError("a classifier needs at least 2 classes")
    model = SIGNAL_MODELS[spec.name](spec)
    model.medpipe_task = as_task(spec.task)  # type: ignore[assignment]
    return model


__all__ = ["SIGNAL_MODELS", "ResNet1d", "RecurrentNet", "SignalModelSpec", "SignalNet", "build_signal_model",
           "check_signal_model", "standardise"]
