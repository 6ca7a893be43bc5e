"""The store's device credentials and operators, on SQLite and on PostgreSQL: certificate
renewal (the certificate renewed from, and when it stops being accepted), operator roles,
revocation and the audit log."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.domain import AuditEntry
from cloud.store import Store, open_store
from edge_agent.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from tests.support.stores import NOT_AFTER, NOW
from tests.support.stores import activate_cert as _activate
from tests.support.stores import issue_cert as _issue


class CredentialsContract:
    def test_renewal_makes_the_new_certificate_current_and_the_old_one_a_grace(
        self, store: Store
    ) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        enrolled, _ = store.enroll("h1", NOW, _issue, _activate)
        assert enrolled.cert_not_after == NOT_AFTER
        old = enrolled.cert_fingerprint
        later = NOW + dt.timedelta(days=200)
        grace = dt.timedelta(hours=1)

        def activate(_: str) -> tuple[str, str, dt.datetime]:
            return "serial-2", "fp-new", later + dt.timedelta(days=365)

        renewed, cert = store.renew_certificate(device.id, old, later, grace, _issue, activate)
        assert cert == f"cert-for-{device.id}"
        assert (renewed.cert_fingerprint, renewed.previous_fingerprint) == ("fp-new", old)
        assert renewed.cert_not_after == later + dt.timedelta(days=365)
        # The one renewed from: accepted until it expires itself (an answer lost before a
        # long time offline), or until the device first uses the new one.
        assert renewed.previous_valid_until == NOT_AFTER
        assert renewed.accepts(old, NOT_AFTER - dt.timedelta(seconds=1))
        assert not renewed.accepts(old, NOT_AFTER) and renewed.accepts("fp-new", later)
        credentials = store.device_credentials([device.id], later + grace)
        assert credentials == {device.id: (True, frozenset({"fp-new", old}))}
        # A retry from the old certificate (the answer was lost) renews again.
        again, _ = store.renew_certificate(device.id, old, later, grace, _issue, activate)
        assert again.previous_fingerprint == old
        with pytest.raises(PermissionDenied, match="no longer current"):
            store.renew_certificate(device.id, old, NOT_AFTER, grace, _issue, activate)
        with pytest.raises(PermissionDenied, match="no longer current"):
            store.renew_certificate(device.id, "fp-stranger", later, grace, _issue, activate)
        store.forget_previous_certificate(device.id, "fp-other")  # not the current one: no-op
        assert store.get_device(device.id).previous_fingerprint == old
        store.forget_previous_certificate(device.id, "fp-new")
        assert not store.get_device(device.id).accepts(old, later)
        assert store.device_credentials([device.id], later) == {
            device.id: (True, frozenset({"fp-new"}))
        }
        store.revoke_device(device.id, "stolen", later)
        with pytest.raises(PermissionDenied, match="may not renew"):
            store.renew_certificate(device.id, "fp-new", later, grace, _issue, activate)

    def test_an_expiry_is_learnt_once_for_devices_enrolled_before_it_was_recorded(
        self, store: Store
    ) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))

        def unknown_expiry(cert: str) -> tuple[str, str, dt.datetime | None]:
            return "serial-1", "fp-" + cert[-6:], None

        enrolled, _ = store.enroll("h1", NOW, _issue, unknown_expiry)  # type: ignore[arg-type]
        assert enrolled.cert_not_after is None
        store.record_cert_expiry(device.id, "fp-stranger", NOT_AFTER)  # not its certificate
        assert store.get_device(device.id).cert_not_after is None
        store.record_cert_expiry(device.id, enrolled.cert_fingerprint, NOT_AFTER)
        store.record_cert_expiry(device.id, enrolled.cert_fingerprint, NOW)  # known: kept
        assert store.get_device(device.id).cert_not_after == NOT_AFTER

    def test_operator_roles_revocation_and_the_audit_log(self, store: Store) -> None:
        store.add_operator("admin", "hash-a", NOW, role="admin")
        viewer = store.add_operator("vera", "hash-v", NOW, role="viewer")
        assert store.operator_by_token_hash("hash-v").role == "viewer" == viewer.role
        assert [(o.name, o.role) for o in store.list_operators()] == [
            ("admin", "admin"),
            ("vera", "viewer"),
        ]
        with pytest.raises(FailedPrecondition, match="last admin"):
            store.revoke_operator("admin", NOW)
        assert store.revoke_operator("vera", NOW).revoked_at == NOW
        with pytest.raises(Unauthenticated):
            store.operator_by_token_hash("hash-v")
        with pytest.raises(NotFound):
            store.revoke_operator("nobody", NOW)
        for i, who in enumerate(("admin", "vera", "admin")):
            store.add_audit(
                AuditEntry(
                    at=NOW + dt.timedelta(minutes=i), operator=who, role="admin",
                    method=f"M{i}", target="x" * 2000, code="OK",
                )
            )  # fmt: skip
        newest = store.list_audit(None, "", 10)
        assert [e.method for e in newest] == ["M2", "M1", "M0"]
        assert len(newest[0].target) == 512  # bounded to its column
        assert [e.method for e in store.list_audit(None, "admin", 10)] == ["M2", "M0"]
        since = NOW + dt.timedelta(minutes=1)
        assert [e.method for e in store.list_audit(since, "", 1)] == ["M2"]
        # Retention: entries older than the bound go, the rest stay.
        assert store.prune_audit(since) == 1
        assert [e.method for e in store.list_audit(None, "", 10)] == ["M2", "M1"]


@pytest.mark.integration
class TestSqliteCredentials(CredentialsContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
        yield store
        store.close()


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresCredentials(CredentialsContract):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[Store]:
        store = open_store(pg_url)
        yield store
        store.close()
