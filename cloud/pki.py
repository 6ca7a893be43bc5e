"""The control plane's certificate authority: server certificates, device certificates from CSRs."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import IntegrityError, InvalidInput, PermissionDenied

DEVICE_URI_PREFIX = "urn:autoglm:device:"


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate as issued: PEM chain plus what the store remembers of it."""

    chain_pem: bytes
    serial: str
    fingerprint: str
    not_after: dt.datetime


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class CertificateAuthority:
    """Signs server and device certificates with one EC P-256 key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(
        cls, common_name: str = "Open-AutoGLM Edge CA", years: int = 10
    ) -> CertificateAuthority:
        key = new_private_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_pem: bytes, cert_pem: bytes) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IntegrityError("the CA key is not an EC key")
        # The issuing CA first; during a CA change ca.crt also holds the other trusted one.
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            raise IntegrityError(
                "the CA key does not belong to the CA certificate (an interrupted "
                "`autoglm cloud ca activate`? run it again)"
            )
        return cls(key, cert)

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_server_certificate(
        self, hosts: list[str], key: ec.EllipticCurvePrivateKey, years: int = 5
    ) -> x509.Certificate:
        """A TLS server certificate whose SANs are the given DNS names and IP addresses."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = self._leaf(hosts[0], key.public_key(), dt.timedelta(days=365 * years))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        return builder.sign(self.key, hashes.SHA256())

    def key_material(self) -> bytes:
        """The CA key's private bytes, to derive other keys every replica shares from."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def check_device_csr(self, csr_pem: bytes) -> None:
        """What can be judged of a CSR without the device: PEM, signature, key kind. Run
        before the enrollment token is spent."""
        checked_device_key(_load_csr(csr_pem))

    def sign_device_csr(
        self, csr_pem: bytes, device_id: str, validity_days: float, csr_names: str = ""
    ) -> IssuedCertificate:
        """Issues a client certificate for `device_id`; the CSR must name exactly that device
        (its id, or `csr_names`: the name a device enrolling in a group gave itself)."""
        csr = _load_csr(csr_pem)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        subject = names[0].value if names else ""
        expected = csr_names or device_id
        if subject != expected:
            raise PermissionDenied(
                f"the certificate signing request names '{subject!s:.140}', but the enrollment "
                f"is for device '{expected}'"
            )
        public_key = checked_device_key(csr)
        builder = self._leaf(device_id, public_key, dt.timedelta(days=validity_days))
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(
            chain_pem=cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem,
            serial=format(cert.serial_number, "x"),
            fingerprint=certificate_fingerprint(cert),
            not_after=cert.not_valid_after_utc,
        )

    def _leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        validity: dt.timedelta,
    ) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )

    def verify_issued(self, cert: x509.Certificate) -> None:
        """Raises IntegrityError unless `cert` was signed by this CA."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise IntegrityError(f"certificate not issued by this CA: {exc}") from None


def new_signing_key() -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key that signs model bundles."""
    return ed25519.Ed25519PrivateKey.generate()


def public_key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"the certificate signing request is not valid PEM: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidInput("the certificate signing request's signature does not verify")
    return csr


def checked_device_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    """The CSR's key when it is one a device may hold: EC P-256 (what the agent makes, and
    what every TLS stack on the path takes) or Ed25519. Any other curve would be signed and
    then fail every handshake, with the one-time token spent."""
    key = csr.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    kind = (
        f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
    )
    raise InvalidInput(f"device keys must be EC P-256 or Ed25519, the request holds {kind}")
