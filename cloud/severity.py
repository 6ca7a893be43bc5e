"""Alert severity from the peak score's band.

An edge score of 1.0 is the model's decision threshold, so a band is "how far past its
threshold". Rules are tried in order; the first whose selector matches the device's labels
and whose `model_version` (when set) is the alert's gives the bands; else the default bands.
Configured in cloud.yaml:

    alert_severity:
      - selector: "site=plant-a,line=2"
        critical: 2.0
        major: 1.5
        minor: 1.1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud.selectors import parse_selector
from edge_agent.errors import InvalidInput

SEVERITIES = ("critical", "major", "minor", "warning")
# Severity names of the delivery targets that have their own scale.
PAGERDUTY = {"critical": "critical", "major": "error", "minor": "warning", "warning": "info"}


class SeverityRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = ""  # device labels; empty: every device
    model_version: str = ""  # empty: every version
    critical: float = Field(default=3.0, gt=0)
    major: float = Field(default=2.0, gt=0)
    minor: float = Field(default=1.25, gt=0)  # below it (but raised): warning

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        try:
            parse_selector(value)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SeverityRule:
        if not self.critical >= self.major >= self.minor:
            raise ValueError(
                f"bands must satisfy critical >= major >= minor, got {self.critical}, "
                f"{self.major}, {self.minor}"
            )
        return self

    def band(self, score: float) -> str:
        if score >= self.critical:
            return "critical"
        if score >= self.major:
            return "major"
        if score >= self.minor:
            return "minor"
        return "warning"


DEFAULT = SeverityRule()


def severity(
    score: float,
    labels: Mapping[str, str],
    model_version: str,
    rules: Sequence[SeverityRule] = (),
) -> str:
    for rule in rules:
        if rule.model_version and rule.model_version != model_version:
            continue
        if parse_selector(rule.selector).matches(labels):
            return rule.band(score)
    return DEFAULT.band(score)
