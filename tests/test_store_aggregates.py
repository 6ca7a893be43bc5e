"""The store is split by aggregate: every method belongs to exactly one interface
(`cloud/store/base.py`), and components that need one aggregate depend on that one."""

from __future__ import annotations

import inspect

import pytest

from cloud.store import base

pytestmark = pytest.mark.unit
AGGREGATES = (
    base.DeviceStore, base.RecordStore, base.AlertStore, base.MaintenanceStore,
    base.WebhookOutbox, base.LeaseStore, base.SessionClaimStore, base.ModelStore, base.RolloutStore,
    base.OperatorStore,
)  # fmt: skip
OWN = {"shared", "change_listener", "state_counts", "close"}  # the store as a whole


def _declared(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if inspect.isfunction(v) or isinstance(v, property)}


def test_every_store_method_belongs_to_one_aggregate() -> None:
    seen: dict[str, str] = {}
    for aggregate in AGGREGATES:
        for name in _declared(aggregate):
            assert name not in seen, f"{name} in {seen.get(name)} and {aggregate.__name__}"
            seen[name] = aggregate.__name__
    abstract = set(base.Store.__abstractmethods__)
    assert abstract - OWN == set(seen), abstract ^ set(seen)


@pytest.mark.parametrize(
    ("module", "aggregate"),
    [
        ("cloud.presence", "DeviceStore"),
        ("cloud.leader", "LeaseStore"),
        ("cloud.alerts", "AlertStore"),
        ("cloud.service.guard", "OperatorStore"),
        ("cloud.service.records", "RecordStore"),
        ("cloud.service.replacements", "SessionClaimStore"),
    ],
)
def test_components_depend_on_their_aggregate(module: str, aggregate: str) -> None:
    import importlib

    source = inspect.getsource(importlib.import_module(module))
    assert f"store: {aggregate}" in source, f"{module} should take a {aggregate}"
