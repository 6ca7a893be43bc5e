"""Point-wise detection metrics of the SKAB protocol: counts summed over files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Counts:
    """Confusion counts over scored rows."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, predicted: npt.NDArray[np.bool_], actual: npt.NDArray[np.bool_]) -> Counts:
        return cls(
            tp=int((predicted & actual).sum()),
            fp=int((predicted & ~actual).sum()),
            fn=int((~predicted & actual).sum()),
            tn=int((~predicted & ~actual).sum()),
        )

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def f1(self) -> float:
        denominator = self.tp + (self.fn + self.fp) / 2
        return self.tp / denominator if denominator else 0.0

    @property
    def far(self) -> float:
        """False-alarm rate: share of normal rows flagged."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        """Missed-alarm rate: share of fault rows not flagged."""
        return self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "f1": round(self.f1, 4),
            "far": round(self.far, 4),
            "mar": round(self.mar, 4),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }
