"""Training the sensor-graph network: seeded, CPU by default, CUDA with mixed precision.

Loss = forecast MSE on windows known or assumed normal (learned from normal data alone)
+ binary cross-entropy of the fault head where labels exist (files without the label column
count as normal operation).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cloud.model.dataset import WindowSet
from cloud.model.net import NetConfig, SensorGraphNet
from edge_agent.inference.threads import compute_threads
from edge_agent.windowing import FloatArray

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainParams:
    """Optimisation settings."""

    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    fault_weight: float = 1.0
    noise: float = 0.05
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0: the cores this process may use, at most 2


@dataclass
class TrainReport:
    """What happened, for the manifest."""

    epochs: int
    windows: int
    labelled_faults: int
    seconds: float
    device: str
    losses: list[float] = field(default_factory=list)


def set_torch_threads(requested: int = 0) -> int:
    """Sets torch's thread count deliberately; returns it. More threads than free cores spin
    in OpenMP barriers on a busy machine (a 36 s training took 15 CPU-minutes that way), so the
    default is the cores this process may run on, capped at 2: the small network gains little
    from more."""
    requested = compute_threads(requested)
    torch.set_num_threads(requested)
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_net(cfg: NetConfig, center: FloatArray, scale: FloatArray) -> SensorGraphNet:
    net = SensorGraphNet(cfg)
    net.set_normalisation(torch.from_numpy(center), torch.from_numpy(scale))
    return net


def train_net(
    net: SensorGraphNet, data: WindowSet, params: TrainParams, progress: ProgressFn | None = None
) -> TrainReport:
    """Fit `net` on `data` (z-space windows); returns the report, leaves `net` on the CPU."""
    seed_everything(params.seed)
    device = pick_device(params.device)
    net.to(device).train()
    center = net.center.detach().cpu().numpy()
    scale = net.scale.detach().cpu().numpy()
    x_all = torch.from_numpy(data.z * scale + center)
    m_all = torch.from_numpy(data.mask)
    y_all = torch.from_numpy(np.where(data.label < 0, 0.0, data.label).astype(np.float32))
    normal = y_all < 0.5
    positives = float(y_all.sum())
    pos_weight = torch.tensor(max(1.0, (len(y_all) - positives) / max(positives, 1.0)))
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )
    steps = params.epochs * ((len(y_all) + params.batch_size - 1) // params.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=params.learning_rate, total_steps=max(steps, 1)
    )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(params.seed)
    noise_scale = torch.from_numpy(scale) * params.noise
    report = TrainReport(params.epochs, len(y_all), int(positives), 0.0, device.type)
    started = time.monotonic()
    step = 0
    for _epoch in range(params.epochs):
        order = torch.randperm(len(y_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), params.batch_size):
            idx = order[start : start + params.batch_size]
            noise = torch.randn(len(idx), *x_all.shape[1:], generator=generator) * noise_scale
            x = (x_all[idx] + noise).to(device)
            m, y, ok = m_all[idx].to(device), y_all[idx].to(device), normal[idx].to(device)
            with torch.autocast(device.type, enabled=use_amp):
                prob, residual, _ = net(x, m)
            prob = prob.float().clamp(1e-6, 1 - 1e-6)
            forecast = (residual.float().mean(dim=1) * ok).sum() / ok.sum().clamp(min=1)
            weights = torch.where(y > 0.5, pos_weight.to(device), torch.ones_like(y))
            fault = nn.functional.binary_cross_entropy(prob, y, weight=weights)
            loss = forecast + params.fault_weight * fault
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimiser)
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            scaler.step(optimiser)
            scaler.update()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            step += 1
            if progress is not None:
                progress(step, steps, float(loss.detach()))
        report.losses.append(total / len(order))
    report.seconds = time.monotonic() - started
    net.to("cpu").eval()
    return report


class TorchWindowModel:
    """The PyTorch network behind the `WindowModel` interface (eager baseline, evaluation)."""

    def __init__(self, net: SensorGraphNet) -> None:
        self.net = net.eval()

    def run(
        self, window: FloatArray, mask: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        with torch.inference_mode():
            prob, residual, contribution = self.net(
                torch.from_numpy(window), torch.from_numpy(mask)
            )
        return prob.numpy(), residual.numpy(), contribution.numpy()
