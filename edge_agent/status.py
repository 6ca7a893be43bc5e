"""`autoglm-edge status`: what this device's state directory says, read without the agent
(which may be running): identity, the model slots, open alerts, the outbox and its
quarantine, calibrations, and streams kept at the last graceful stop."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any


def read_status(state_dir: Path) -> dict[str, Any]:
    """Every part that can be read; a part that cannot says why instead."""
    return {
        "state_dir": str(state_dir),
        "identity": _part(lambda: _identity(state_dir)),
        "models": _part(lambda: _models(state_dir)),
        "signing_keys": _part(lambda: _signing_keys(state_dir)),
        "open_alerts": _part(lambda: _open_alerts(state_dir)),
        "outbox": _part(lambda: _outbox(state_dir)),
        "calibrations": _part(lambda: _calibrations(state_dir)),
        "kept_streams": sorted(p.stem for p in (state_dir / "stream").glob("*.npz")),
    }


def _part(read: Any) -> Any:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - status reports what it cannot read
        return {"error": f"{type(exc).__name__}: {exc}"}


def _identity(state_dir: Path) -> dict[str, Any]:
    from cryptography import x509

    from edge_agent.identity import load_identity

    identity = load_identity(state_dir)
    leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    return {
        "device": identity.info.device_name,
        "device_id": identity.info.device_id,
        "control_plane": identity.info.device_address,
        "certificate_valid_until": leaf.not_valid_after_utc.isoformat(),
    }


def _signing_keys(state_dir: Path) -> dict[str, Any]:
    """The root the device took (root version 1: the key pinned at enrollment alone)."""
    from edge_agent.bundle import load_public_key
    from edge_agent.identity import load_identity
    from edge_agent.trust import DeviceTrust

    pinned = load_public_key(load_identity(state_dir).signing_public_pem, "pinned key")
    trust = DeviceTrust(state_dir, pinned)
    return {
        "root_version": trust.version,
        "keys": sorted(trust.keys.keys),
        "expires": trust.root.expires.isoformat() if trust.root else None,
    }


def _models(state_dir: Path) -> dict[str, Any]:
    from edge_agent.slots import POINTER

    path = state_dir / "models" / POINTER
    if not path.exists():
        return {"active": None, "note": "no installed slot: serves model.bundle of the config"}
    doc = json.loads(path.read_text())
    return {"active": doc.get("active"), "previous": doc.get("previous"),
            "failed": doc.get("failed") or {}}  # fmt: skip


def _open_alerts(state_dir: Path) -> list[dict[str, Any]]:
    """Kept in the outbox; those an older agent kept as files until the outbox takes them."""
    from edge_agent.open_alerts import decode_alert
    from edge_agent.outbox_files import legacy_files, read_only

    view = read_only(state_dir / "outbox.sqlite3")
    kept = dict(view.open_alerts) if view is not None else {}
    if view is None or not view.migrated:
        kept = legacy_files(state_dir / "alerts") | kept
    alerts = []
    for asset, text in sorted(kept.items()):
        event = decode_alert(text, asset)
        if event is not None:
            alerts.append({"asset": asset, "key": event.key, "score": event.score,
                           "raised_at": _when(event.raised_at)})  # fmt: skip
    return alerts


def _outbox(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "outbox.sqlite3"
    if not path.exists():
        return {"depth": 0, "note": "no outbox yet"}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        depth, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records"
        ).fetchone()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        reasons = (
            db.execute("SELECT seq, reason FROM quarantine ORDER BY seq DESC LIMIT 3").fetchall()
            if "quarantine" in tables
            else []
        )
    return {
        "depth": depth,
        "bytes": size,
        "acked_up_to": meta.get("acked", 0),
        "evicted": meta.get("evicted", 0),
        "quarantined": meta.get("quarantined", 0),
        "latest_refusals": [{"sequence": s, "reason": r} for s, r in reasons],
    }


def _calibrations(state_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted((state_dir / "calibration").glob("*/*.json")):
        doc = json.loads(path.read_text())
        found.append({"model_version": path.parent.name, "asset": path.stem,
                      "rows": doc.get("rows")})  # fmt: skip
    return found


def _when(seconds: object) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()
