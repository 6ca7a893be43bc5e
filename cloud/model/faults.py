"""Physically plausible faults injected into real normal sensor history, for honest evaluation.

A detector chosen on the one fault kind of the development data learns that kind. These
faults are what the model must also catch without labels: each is written into a copy of a
normal stretch at a random onset and duration, sized in the site's own noise (the standard
deviation of each sensor over the calibration rows), and labelled. Sensors are picked by role
from their names (vibration, flow, pressure, temperature); a schema without such names gets
random sensors, so the same kinds run on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.windowing import FloatArray

ROLES = {
    "vibration": ("accel", "vib", "rms"),
    "flow": ("flow", "volume"),
    "pressure": ("press",),
    "temperature": ("temp", "thermo"),
}


@dataclass(frozen=True)
class Stretch:
    """A normal stretch: values [R, N] (NaN = missing) and how many rows calibrate."""

    name: str
    values: FloatArray
    calibration_rows: int


@dataclass(frozen=True)
class Injected:
    name: str
    kind: str
    values: FloatArray
    labels: np.ndarray  # [R] bool


@dataclass(frozen=True)
class _Context:
    values: npt.NDArray[np.float64]  # the copy being changed
    start: int
    stop: int
    sigma: FloatArray  # [N] site noise
    sensors: tuple[str, ...]
    rng: np.random.Generator
    corr: FloatArray  # [N, N] over the calibration rows

    @property
    def span(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def length(self) -> int:
        return self.stop - self.start

    def ramp(self) -> npt.NDArray[np.float64]:
        return np.linspace(0.0, 1.0, self.length)

    def pick(self, role: str, count: int = 1) -> list[int]:
        """Sensors of a role by name, at most `count` (0: all of them); a schema without such
        a name gets one random sensor."""
        words = ROLES.get(role, ())
        found = [j for j, s in enumerate(self.sensors) if any(w in s.lower() for w in words)]
        if not found:
            return [self.one()]
        return found[:count] if count else found

    def one(self) -> int:
        return int(self.rng.integers(len(self.sensors)))


def _drift(c: _Context) -> None:
    j = c.one()
    c.values[c.span, j] += c.rng.choice([-1, 1]) * 5.0 * c.sigma[j] * c.ramp()


def _stuck(c: _Context) -> None:
    j = c.one()
    c.values[c.span, j] = c.values[c.start - 1, j]


def _step(c: _Context) -> None:
    j = c.one()
    c.values[c.span, j] += c.rng.choice([-1, 1]) * 4.0 * c.sigma[j]


def _vibration(c: _Context) -> None:
    for j in c.pick("vibration", 0):
        grow = 1.0 + 3.0 * c.ramp()
        c.values[c.span, j] += c.sigma[j] * (3.0 * c.ramp() + grow * c.rng.normal(size=c.length))


def _broken_correlation(c: _Context) -> None:
    """The partner of the most correlated pair keeps its level and spread but stops following:
    it replays its own calibration stretch instead."""
    corr = np.abs(np.nan_to_num(c.corr)) - np.eye(c.corr.shape[0])
    i, j = np.unravel_index(int(np.argmax(corr)), corr.shape)
    source = c.values[: c.start, j]
    source = source[np.isfinite(source)]
    if source.size < 2:
        return
    replay = np.resize(source[::-1] - source.mean(), c.length)
    c.values[c.span, j] = c.values[c.start - 1, j] + replay
    del i


def _leak(c: _Context) -> None:
    for j in c.pick("pressure"):
        c.values[c.span, j] -= 4.0 * c.sigma[j] * np.minimum(1.0, 3.0 * c.ramp())
    for j in c.pick("flow"):
        c.values[c.span, j] += 3.0 * c.sigma[j] * np.minimum(1.0, 3.0 * c.ramp())


def _cavitation(c: _Context) -> None:
    for j in c.pick("vibration", 0):
        c.values[c.span, j] += c.sigma[j] * (3.0 + 2.0 * np.abs(c.rng.normal(size=c.length)))
    t = np.arange(c.length)
    for j in c.pick("flow"):
        c.values[c.span, j] += 3.0 * c.sigma[j] * np.sin(2 * np.pi * t / 10.0)


def _temperature(c: _Context) -> None:
    for j in c.pick("temperature", 0):
        c.values[c.span, j] += 6.0 * c.sigma[j] * c.ramp()


def _none(c: _Context) -> None:
    """No fault: the false alarms of the background alone (its "fault" rows are normal too)."""


KINDS: dict[str, Callable[[_Context], None]] = {
    "drift": _drift,
    "stuck": _stuck,
    "step": _step,
    "vibration": _vibration,
    "broken-correlation": _broken_correlation,
    "leak": _leak,
    "cavitation": _cavitation,
    "temperature-ramp": _temperature,
}
BACKGROUND = {"none": _none}


def inject(
    stretch: Stretch,
    kind: str,
    sensors: tuple[str, ...],
    rng: np.random.Generator,
    min_share: float = 0.3,
    max_share: float = 0.7,
) -> Injected:
    """A copy of `stretch` with one fault of `kind` after its calibration rows."""
    values = stretch.values.astype(np.float64, copy=True)
    k = stretch.calibration_rows
    scored = values.shape[0] - k
    length = max(2, int(scored * rng.uniform(min_share, max_share)))
    start = k + int(rng.integers(1, max(2, scored - length)))
    stop = min(values.shape[0], start + length)
    cal = values[:k]
    sigma = np.nanstd(cal, axis=0)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1e-3)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(np.nan_to_num(cal - np.nanmean(cal, axis=0)).T)
    context = _Context(values, start, stop, sigma, sensors, rng, np.atleast_2d(corr))
    (KINDS | BACKGROUND)[kind](context)
    labels = np.zeros(values.shape[0], dtype=bool)
    if kind != "none":
        labels[start:stop] = True
    return Injected(stretch.name, kind, values.astype(np.float32), labels)
