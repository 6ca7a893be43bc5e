"""Device lifecycle: register, enroll, authenticate, label, revoke."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cloud.clock import Clock, utc_now
from cloud.domain import DeviceRecord, DeviceState, EnrollmentGroup, validate_labels
from cloud.pki import CertificateAuthority, IssuedCertificate
from cloud.selectors import Selector
from cloud.store import Store
from cloud.tokens import ENROLLMENT_PREFIX, GROUP_PREFIX, hash_token, new_token
from edge_agent.errors import InvalidInput, PermissionDenied, Unauthenticated

NAME_MAX = 128
GROUP_USES_MAX = 100_000
GROUP_TTL_MAX = dt.timedelta(days=366)


@dataclass(frozen=True)
class Registration:
    """A registered device and its one-time enrollment token (shown once)."""

    device: DeviceRecord
    token: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Enrollment:
    device: DeviceRecord
    certificate: IssuedCertificate


class DeviceRegistry:
    """The device lifecycle over a store and the CA."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        token_ttl: dt.timedelta,
        cert_validity_days: float,
        known_profiles: frozenset[str] | None = None,
        clock: Clock = utc_now,
        cert_grace: dt.timedelta = dt.timedelta(days=7),
    ) -> None:
        self.cert_grace = cert_grace
        self.store = store
        self.ca = ca
        self.token_ttl = token_ttl
        self.cert_validity_days = cert_validity_days
        self.known_profiles = known_profiles
        self.clock = clock

    def register(
        self,
        name: str,
        labels: Mapping[str, str],
        profile: str,
        token_ttl: dt.timedelta | None = None,
    ) -> Registration:
        """Creates a pending device and its enrollment token."""
        name = checked_name("device", name)
        self._check_profile(profile)
        now = self.clock()
        device = self.store.create_device(name, validate_labels(labels), profile, now)
        return self._issue_token(device, now, token_ttl)

    def _check_profile(self, profile: str) -> None:
        if self.known_profiles is not None and profile and profile not in self.known_profiles:
            raise InvalidInput(
                f"unknown device profile '{profile}'; "
                f"known: {', '.join(sorted(self.known_profiles))}"
            )

    def create_group(
        self,
        name: str,
        labels: Mapping[str, str],
        profile: str,
        max_uses: int,
        ttl: dt.timedelta,
    ) -> tuple[EnrollmentGroup, str]:
        """An enrollment group and its token (shown once): for factory images, each device
        enrolls under its own name with the group's labels (`{name}`: its name) and profile."""
        name = checked_name("enrollment group", name)
        self._check_profile(profile)
        if not 1 <= max_uses <= GROUP_USES_MAX:
            raise InvalidInput(f"uses must be 1-{GROUP_USES_MAX}, got {max_uses}")
        if not dt.timedelta(0) < ttl <= GROUP_TTL_MAX:
            raise InvalidInput(f"an enrollment group expires within {GROUP_TTL_MAX.days} days")
        now = self.clock()
        group = EnrollmentGroup(name, validate_labels(labels), profile, max_uses, 0, now, now + ttl)
        group.labels_for("x" * NAME_MAX)  # any device name yields valid labels
        token = new_token(GROUP_PREFIX)
        return self.store.create_enrollment_group(group, hash_token(token)), token

    def new_enrollment_token(
        self, id_or_name: str, token_ttl: dt.timedelta | None = None
    ) -> Registration:
        """A fresh token for a device that has not enrolled yet (or must re-enroll)."""
        device = self.store.get_device(id_or_name)
        return self._issue_token(device, self.clock(), token_ttl)

    def _issue_token(
        self, device: DeviceRecord, now: dt.datetime, token_ttl: dt.timedelta | None
    ) -> Registration:
        token = new_token(ENROLLMENT_PREFIX)
        expires_at = now + (token_ttl or self.token_ttl)
        self.store.add_enrollment_token(device.id, hash_token(token), now, expires_at)
        return Registration(device=device, token=token, expires_at=expires_at)

    def enroll(self, token: str, csr_pem: bytes, device_name: str = "") -> Enrollment:
        """Exchanges an enrollment token and a CSR for a device certificate: a one-time
        token for its registered device, or a group token for a new device `device_name`."""
        group = token.startswith(GROUP_PREFIX)
        if not group and not token.startswith(ENROLLMENT_PREFIX):
            raise Unauthenticated("that is not an enrollment token")
        if group and not device_name.strip():
            raise InvalidInput(
                "a group enrollment token needs the device's own name "
                "(autoglm-edge enroll --name NAME)"
            )
        self.ca.check_device_csr(csr_pem)  # before the token is spent

        def issue(device: DeviceRecord) -> IssuedCertificate:
            return self.ca.sign_device_csr(csr_pem, device.id, self.cert_validity_days)

        now = self.clock()
        if group:
            name = checked_name("device", device_name)

            def issue_named(device: DeviceRecord) -> IssuedCertificate:
                return self.ca.sign_device_csr(
                    csr_pem, device.id, self.cert_validity_days, csr_names=name
                )

            device, cert = self.store.enroll_in_group(
                hash_token(token), name, now, issue_named, _activate
            )
        else:
            device, cert = self.store.enroll(hash_token(token), now, issue, _activate)
        return Enrollment(device=device, certificate=cert)

    def renew(self, device_id: str, presented: str, csr_pem: bytes) -> IssuedCertificate:
        """A new certificate for an active device, for the key of `csr_pem`, over mutual TLS
        with a certificate the device accepts now (`presented`, its fingerprint)."""
        self.ca.check_device_csr(csr_pem)

        def issue(device: DeviceRecord) -> IssuedCertificate:
            return self.ca.sign_device_csr(csr_pem, device.id, self.cert_validity_days)

        _, cert = self.store.renew_certificate(
            device_id, presented, self.clock(), self.cert_grace, issue, _activate
        )
        return cert

    def authenticate(self, device_id: str, cert_fingerprint: str) -> DeviceRecord:
        """The device a verified client certificate belongs to, if it may still act."""
        device = self.store.get_device(device_id)
        if device.id != device_id:  # a name that happens to equal another device's id
            raise Unauthenticated("certificate does not name a device")
        if device.state is DeviceState.REVOKED:
            raise PermissionDenied(f"device '{device.name}' is revoked")
        if device.state is not DeviceState.ACTIVE or not device.accepts(
            cert_fingerprint, self.clock()
        ):
            raise PermissionDenied(
                f"device '{device.name}' presented a certificate that is no longer current; "
                "re-enroll the device"
            )
        if device.previous_fingerprint and cert_fingerprint == device.cert_fingerprint:
            # Renewed, and now using the new certificate: the old one has had its use.
            self.store.forget_previous_certificate(device.id, cert_fingerprint)
        return device

    def get(self, id_or_name: str) -> DeviceRecord:
        return self.store.get_device(id_or_name)

    def list(self, selector: Selector | Mapping[str, str]) -> list[DeviceRecord]:
        return self.store.list_devices(selector)

    def label(
        self, id_or_name: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> DeviceRecord:
        return self.store.update_labels(id_or_name, validate_labels(set_labels), remove)

    def revoke(self, id_or_name: str, reason: str) -> DeviceRecord:
        return self.store.revoke_device(id_or_name, reason, self.clock())


def _activate(cert: IssuedCertificate) -> tuple[str, str, dt.datetime]:
    return cert.serial, cert.fingerprint, cert.not_after


def checked_name(what: str, name: str) -> str:
    """A device's or an operator's name, stripped: 1-NAME_MAX characters, no whitespace, '/'
    or ',' (names appear in selectors, paths and lists); InvalidInput otherwise."""
    name = name.strip()
    if not name or len(name) > NAME_MAX or any(c.isspace() or c in "/," for c in name):
        raise InvalidInput(
            f"{what} name '{name}' must be 1-{NAME_MAX} characters without spaces, '/' or ','"
        )
    return name
