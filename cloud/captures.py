"""Captured windows: raw aligned windows devices sync for retraining, and their labels.

A capture of a raised alert's window carries the edge's alert key; the cloud alert that raise
folded into holds the operator's verdict. The label of a window for training follows from it:
verdict `true` -> 1 (a verified fault), `false` -> 0 (a false alarm: normal), a sampled normal
window -> 0 (as the model judged it, like unlabelled training files), an alert nobody judged
yet (or judged `unsure`) -> -1 (unknown: left out of fine-tuning).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cloud.domain import VERDICTS
from edge_agent.errors import InvalidInput
from edge_agent.windowing import FloatArray

if TYPE_CHECKING:
    from cloud.store.base import Store

REASONS = ("alert", "sample")
MAX_ROWS = 4096  # T of one window
MAX_SENSORS = 256  # N
MAX_CELLS = 65_536  # T * N: 256 KiB of float32 values
PAGE_SIZE, MAX_PAGE_SIZE = 200, 1000
# What one page of a listing may hold in memory (`held_bytes`): a largest capture read back
# holds about 4.2 MiB (its calibration's numbers as Python floats), so 1,000 of them would
# be 4 GiB. A page ends before the capture that would pass it.
PAGE_BYTES = 64 << 20
VERDICT_FILTERS = ("", "none", *VERDICTS)  # "": any; "none": no verdict yet


@dataclass(frozen=True)
class CaptureCalibration:
    """The rest of the site calibration a window was scored under (`input_center` and
    `input_scale` are the capture's own): what the decision's evidence needs besides the
    network (`edge_agent.calibration.SiteCalibration`). The level fields are empty where the
    model's decision uses no levels; `level_precision` is N*N, row-major. The subspace fields
    are empty where the site has no subspace (or the agent predates them: the kind is off
    for that window); `subspace_basis` is N*k, row-major."""

    residual_scale: tuple[float, ...]
    level_center: tuple[float, ...] = ()
    level_scale: tuple[float, ...] = ()
    spread_center: tuple[float, ...] = ()
    level_precision: tuple[float, ...] = ()
    subspace_center: tuple[float, ...] = ()
    subspace_basis: tuple[float, ...] = ()
    subspace_scale: tuple[float, ...] = ()

    def as_doc(self) -> dict[str, list[float]]:
        """A JSON-ready dict (the store's column, the export's struct)."""
        return {name: list(getattr(self, name)) for name in CALIBRATION_FIELDS}

    @staticmethod
    def from_doc(doc: dict[str, list[float]]) -> CaptureCalibration:
        return CaptureCalibration(
            **{name: tuple(float(x) for x in doc.get(name) or ()) for name in CALIBRATION_FIELDS}
        )


CALIBRATION_FIELDS = (
    "residual_scale",
    "level_center",
    "level_scale",
    "spread_center",
    "level_precision",
    "subspace_center",
    "subspace_basis",
    "subspace_scale",
)
LEVEL_FIELDS = ("level_center", "level_scale", "spread_center", "level_precision")
SUBSPACE_FIELDS = ("subspace_center", "subspace_basis", "subspace_scale")
SCALE_FIELDS = ("residual_scale", "level_scale", "subspace_scale")


@dataclass(frozen=True)
class CaptureRecord:
    """One captured window as stored: values float32 little-endian row-major [T * N], the
    mask as packed bits (numpy `packbits` order), row k at window_start + k * period_s."""

    device_id: str
    sequence: int
    reason: str
    asset: str
    model_version: str
    alert_key: str
    score: float
    window_start: dt.datetime
    period_s: float
    length: int
    sensors: tuple[str, ...]
    values: bytes
    mask: bytes
    input_center: tuple[float, ...]
    input_scale: tuple[float, ...]
    received_at: dt.datetime | None = None
    calibration: CaptureCalibration | None = None  # None: an agent from before it was sent

    def numbers(self) -> int:
        """How many numbers its input normalisation and site calibration hold."""
        count = len(self.input_center) + len(self.input_scale)
        if self.calibration is not None:
            count += sum(len(getattr(self.calibration, name)) for name in CALIBRATION_FIELDS)
        return count

    @property
    def window_end(self) -> dt.datetime:
        return self.window_start + dt.timedelta(seconds=(self.length - 1) * self.period_s)

    def arrays(self) -> tuple[FloatArray, FloatArray]:
        """Values [T, N] (NaN where no reading) and the mask [T, N] (1 = a reading)."""
        t, n = self.length, len(self.sensors)
        values = np.frombuffer(self.values, dtype="<f4").astype(np.float32).reshape(t, n)
        bits = np.unpackbits(np.frombuffer(self.mask, dtype=np.uint8), count=t * n)
        mask = bits.reshape(t, n).astype(np.float32)
        return np.where(mask > 0, values, np.nan).astype(np.float32), mask


MAX_PERIOD_S = 86_400.0  # a grid period longer than a day is no sensor stream


def check_capture(c: CaptureRecord, where: str) -> None:
    """InvalidInput naming what is wrong with a capture a device sent."""
    n = len(c.sensors)
    if c.reason not in REASONS:
        raise InvalidInput(f"{where}: capture without a reason (alert or sample)")
    if not c.asset:
        raise InvalidInput(f"{where}.asset: empty")
    if c.reason == "alert" and not c.alert_key:
        raise InvalidInput(f"{where}.alert_key: an alert window without its alert key")
    if not 1 <= c.length <= MAX_ROWS:
        raise InvalidInput(f"{where}.length: {c.length} rows; 1 to {MAX_ROWS} are taken")
    if not 1 <= n <= MAX_SENSORS:
        raise InvalidInput(f"{where}.sensors: {n} sensors; 1 to {MAX_SENSORS} are taken")
    if c.length * n > MAX_CELLS:
        raise InvalidInput(
            f"{where}: a window of {c.length} x {n} = {c.length * n} values > {MAX_CELLS}"
        )
    if len(set(c.sensors)) != n or not all(c.sensors):
        raise InvalidInput(f"{where}.sensors: names must be unique and not empty")
    if not 0 < c.period_s <= MAX_PERIOD_S:
        raise InvalidInput(
            f"{where}.period_seconds: {c.period_s}; more than 0 and at most {MAX_PERIOD_S:g} "
            "are taken"
        )
    try:
        c.window_end  # noqa: B018 - the window must end on a calendar date
    except OverflowError:
        raise InvalidInput(f"{where}.window_start: its window ends past the year 9999") from None
    if len(c.values) != 4 * c.length * n:
        raise InvalidInput(
            f"{where}.values: {len(c.values)} bytes; a {c.length} x {n} window of float32 "
            f"takes {4 * c.length * n}"
        )
    if len(c.mask) != (c.length * n + 7) // 8:
        raise InvalidInput(
            f"{where}.mask: {len(c.mask)} bytes; {c.length * n} bits take {(c.length * n + 7) // 8}"
        )
    values = np.frombuffer(c.values, dtype="<f4")
    if not np.isfinite(values).all():
        bad = int(np.argmax(~np.isfinite(values)))
        raise InvalidInput(
            f"{where}.values: row {bad // n}, sensor {c.sensors[bad % n]!r} is "
            f"{values[bad]} (not a finite number; send 0 with the mask bit off)"
        )
    for name, vector in (("input_center", c.input_center), ("input_scale", c.input_scale)):
        if len(vector) != n:
            raise InvalidInput(f"{where}.{name}: {len(vector)} values for {n} sensors")
    if min(c.input_scale) <= 0:
        raise InvalidInput(f"{where}.input_scale: every scale must be positive")
    if c.calibration is not None:
        check_calibration(c.calibration, n, f"{where}.calibration")


def check_calibration(cal: CaptureCalibration, n: int, where: str) -> None:
    """InvalidInput unless every vector has N values (the level ones N or none, the
    precision N*N with them; the subspace ones N or none, the basis N*k with them, 1 <= k
    < N, and only with the level fields), every value is finite and every scale positive.
    The values are checked as arrays (up to 2 x 65,536 of them), naming the first bad one."""
    levels = any(getattr(cal, name) for name in LEVEL_FIELDS)
    subspace = any(getattr(cal, name) for name in SUBSPACE_FIELDS)
    if subspace and not levels:
        raise InvalidInput(f"{where}.subspace_center: a subspace without the level fields")
    k = len(cal.subspace_basis) // n
    if subspace and not (len(cal.subspace_basis) == n * k and 1 <= k < n):
        raise InvalidInput(
            f"{where}.subspace_basis: {len(cal.subspace_basis)} values; {n} sensors take "
            f"{n} x k with 1 <= k < {n}"
        )
    for name in CALIBRATION_FIELDS:
        vector = getattr(cal, name)
        want = {"level_precision": n * n, "subspace_basis": n * k}.get(name, n)
        if (name in LEVEL_FIELDS and not levels) or (name in SUBSPACE_FIELDS and not subspace):
            want = 0
        if len(vector) != want:
            group = "subspace" if name in SUBSPACE_FIELDS else "level"
            raise InvalidInput(
                f"{where}.{name}: {len(vector)} values; {n} sensors take {want}"
                + ("" if name == "residual_scale" else f" (or none of the {group} fields)")
            )
        values = np.fromiter(vector, dtype=np.float64, count=len(vector))
        if not np.isfinite(values).all():
            bad = int(np.argmin(np.isfinite(values)))
            raise InvalidInput(f"{where}.{name}[{bad}]: {values[bad]} is not a finite number")
        if name in SCALE_FIELDS and values.size and values.min() <= 0:
            bad = int(np.argmin(values))
            raise InvalidInput(
                f"{where}.{name}[{bad}]: {values[bad]}; every scale must be positive"
            )


@dataclass(frozen=True)
class CaptureFilter:
    """Which captures a listing returns."""

    since: dt.datetime  # windows ending at or after
    device_ids: tuple[str, ...] | None = None  # None: every device
    verdict: str = ""  # one of VERDICT_FILTERS


@dataclass(frozen=True)
class CaptureLabel:
    """The cloud alert a capture's raise folded into, and the operator's call on it."""

    alert_id: str = ""
    verdict: str = ""
    fault_type: str = ""

    def matches(self, verdict_filter: str) -> bool:
        if verdict_filter == "":
            return True
        if verdict_filter == "none":
            return not self.verdict
        return self.verdict == verdict_filter


def training_label(reason: str, verdict: str) -> int:
    """1 fault, 0 normal, -1 unknown (module docstring)."""
    if reason == "sample":
        return 0
    return {"true": 1, "false": 0}.get(verdict, -1)


def held_bytes(c: CaptureRecord) -> int:
    """About the memory a capture read back holds: its values and mask, 32 bytes a number
    of its calibration (a Python float and its place in a tuple), its names, and the rest."""
    names = sum(64 + len(s) for s in c.sensors)
    return len(c.values) + len(c.mask) + 32 * c.numbers() + names + 1024


def labelled_pages(
    store: Store, where: CaptureFilter, page_size: int, page_bytes: int = PAGE_BYTES
) -> Iterator[list[tuple[CaptureRecord, CaptureLabel]]]:
    """Every matching capture with its label, in pages of at most `page_size` captures and
    `page_bytes` of them in memory (`held_bytes`; read that much at a time, so memory stays
    bounded however much is stored and however large the windows are)."""
    cursor = ("", 0)
    while True:
        batch = store.list_captures(where, cursor, page_size, page_bytes)
        if not batch:
            return
        cursor = (batch[-1].device_id, batch[-1].sequence)
        page = _labelled(store, batch, where)
        del batch  # one page held at a time: none kept while the next is read
        if page:
            yield page
        del page


def _labelled(
    store: Store, batch: list[CaptureRecord], where: CaptureFilter
) -> list[tuple[CaptureRecord, CaptureLabel]]:
    """The captures of `batch` with their labels, those whose verdict `where` takes."""
    labels: dict[tuple[str, str], CaptureLabel] = {}
    for device_id in sorted({c.device_id for c in batch}):
        keys = [c.alert_key for c in batch if c.device_id == device_id and c.alert_key]
        found = store.capture_labels(device_id, keys, where.since)
        labels.update({(device_id, k): v for k, v in found.items()})
    page = [(c, labels.get((c.device_id, c.alert_key), CaptureLabel())) for c in batch]
    return [(c, lab) for c, lab in page if lab.matches(where.verdict)]
