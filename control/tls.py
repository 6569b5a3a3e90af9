"""The site's own TLS certificate and private key: checked before use, kept private.

An admin uploads the certificate (.crt, PEM, with its chain if any) and the private key (.key) from
their certificate provider. Before anything is applied they must parse, belong together, and the
certificate must be valid now; what it names and until when is shown. The files are kept in the
data directory's ``secrets/tls/`` readable by the service only, and are never logged.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from control.site import write_private

MAX_PEM_BYTES = 256 * 1024


class CertificateError(ValueError):
    """The certificate or key cannot be used; the message says why, for the admin."""

    def __init__(self, message: str, field: str = "certificate") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CertificateFacts:
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str

    def describe(self) -> str:
        names = ", ".join(self.names) or "(no name)"
        return f"{names}, valid until {self.not_after:%Y-%m-%d} (issued by {self.issuer})"


def check_pair(certificate_pem: bytes, key_pem: bytes, now: dt.datetime | None = None) -> CertificateFacts:
    """Check that a certificate and key can serve HTTPS; return what the certificate says."""
    now = now or dt.datetime.now(dt.UTC)
    if len(certificate_pem) > MAX_PEM_BYTES or len(key_pem) > MAX_PEM_BYTES:
        raise CertificateError("These files are too large to be a certificate and a key.")
    try:
        chain = x509.load_pem_x509_certificates(certificate_pem)
    except ValueError:
        raise CertificateError("The certificate file is not a PEM certificate (.crt).") from None
    certificate = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError(
            "The private key is protected by a password; upload it without one.", "key"
        ) from None
    except ValueError:
        raise CertificateError("The private key file is not a PEM private key (.key).", "key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ) != certificate.public_key().public_bytes(serialization.Encoding.PEM, public):
        raise CertificateError("The private key does not belong to this certificate.", "key")
    facts = _facts(certificate)
    if facts.not_after < now:
        raise CertificateError(f"The certificate expired on {facts.not_after:%Y-%m-%d}.")
    if facts.not_before > now:
        raise CertificateError(f"The certificate is not valid before {facts.not_before:%Y-%m-%d}.")
    _check_with_openssl(certificate_pem, key_pem)
    return facts


def _facts(certificate: x509.Certificate) -> CertificateFacts:
    return CertificateFacts(
        names=_names(certificate),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        issuer=_common_name(certificate.issuer) or certificate.issuer.rfc4514_string(),
    )


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = alternative.get_values_for_type(x509.DNSName) + [
            str(address) for address in alternative.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        names = []
    common = _common_name(certificate.subject)
    return tuple(names or ([common] if common else []))


def _common_name(name: x509.Name) -> str:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""


def _check_with_openssl(certificate_pem: bytes, key_pem: bytes) -> None:
    """The same check a TLS server makes when it loads the pair (also catches key types it refuses)."""
    with tempfile.TemporaryDirectory() as folder:
        certificate_path, key_path = Path(folder, "site.crt"), Path(folder, "site.key")
        certificate_path.write_bytes(certificate_pem)
        key_path.write_bytes(key_pem)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate_path, key_path)
        except ssl.SSLError as error:
            raise CertificateError(
                f"The certificate and key cannot serve HTTPS: {error.reason}.", "key"
            ) from None


def store_pair(folder: Path, certificate_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Keep the pair in ``folder`` (created private), written atomically; return the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    paths = folder / "site.crt", folder / "site.key"
    for path, content in zip(paths, (certificate_pem, key_pem), strict=True):
        write_private(path, content)
    return paths


def stored_facts(folder: Path) -> CertificateFacts | None:
    """What the stored certificate says (names, validity), or None when there is none."""
    certificate_path = folder / "site.crt"
    if not certificate_path.exists():
        return None
    try:
        return _facts(x509.load_pem_x509_certificates(certificate_path.read_bytes())[0])
    except ValueError:
        return None
