"""The certificates HAProxy serves on the TLS ports (the client port and the dashboard).

`ensure_certificates` runs at every `switchboard up` and `switchboard tls reload`, and
returns what it decided, and why, as a `TlsFiles` snapshot:

- With ``tls_cert`` and ``tls_key`` (the operator's PEM files) it checks that the key
  belongs to the certificate and combines them into ``haproxy.pem``.
- Without, the cluster is its own CA. ``ca.pem`` (10 years; clients trust it) and
  ``ca.key`` are made once. ``server.pem`` and ``server.key`` (ECDSA P-256, 1 year,
  signed by the CA) are made again when missing, within RENEW_BEFORE of expiry, not
  signed by the CA, lacking a name the settings ask for, or when asked to renew.

HAProxy wants the certificate and its key in one file: ``haproxy.pem``, whose path the
config names and the runtime API's ``set ssl cert`` addresses. Keys and ``haproxy.pem``
are 0600, owned by the user who runs `switchboard up`, which is the user HAProxy runs
as (the launcher starts HAProxy without dropping privileges; only the DB tier does).
Every file is written whole under a temporary name and renamed into place.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.cluster.errors import ComponentFailed
from app.cluster.layout import Layout
from app.settings import Settings, is_address

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=365)
# A server certificate this close to its end is made again at the next start or reload.
RENEW_BEFORE = datetime.timedelta(days=30)
# Certificates start a little in the past: a client whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the TLS material is, and what the last `ensure_certificates` did."""

    haproxy_pem: Path  # certificate chain + key, as HAProxy loads it
    ca_file: Path | None  # the cluster's CA certificate; None with operator certificates
    serial: int  # the server certificate's
    not_after: datetime.datetime
    names: tuple[str, ...]  # the server certificate's DNS names and addresses
    decision: str  # what was done and why, for the log

    @classmethod
    def serving(
        cls, cert: x509.Certificate, haproxy_pem: Path, ca_file: Path | None, decision: str
    ) -> TlsFiles:
        return cls(
            haproxy_pem=haproxy_pem,
            ca_file=ca_file,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
            names=certificate_names(cert),
            decision=decision,
        )


def ensure_certificates(settings: Settings, renew: bool = False) -> TlsFiles:
    """Make or check the certificates; see the module docstring."""
    layout = Layout.for_settings(settings)
    layout.tls_dir.mkdir(parents=True, exist_ok=True)
    layout.tls_dir.chmod(0o755)  # ca.pem is for everyone; the keys are 0600 each
    if settings.tls_cert:
        return _operator_files(settings, layout)
    return _generated_files(settings, layout, renew)


def wanted_names(settings: Settings) -> tuple[str, ...]:
    """The names a generated server certificate must hold, in order, without repeats."""
    names = []
    for host in (settings.host, settings.public_host):
        if not host:
            continue
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            unspecified = False
        # Bound to every address: clients reach it by the machine's name.
        names.append(socket.gethostname() if unspecified else host)
    names += ["localhost", "127.0.0.1", "::1", *settings.tls_name_list()]
    return tuple(dict.fromkeys(_canonical(n) for n in names))


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """A certificate's subjectAltName entries: DNS names and addresses, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (the server's own, before any chain)."""
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---- operator certificates -------------------------------------------------------------


def _operator_files(settings: Settings, layout: Layout) -> TlsFiles:
    cert_path, key_path = Path(settings.tls_cert), Path(settings.tls_key)
    try:
        chain = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
        certs = x509.load_pem_x509_certificates(chain)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ComponentFailed(
            f"cannot use tls_cert {cert_path} / tls_key {key_path}: {exc}"
        ) from None
    leaf = certs[0]
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise ComponentFailed(f"tls_key {key_path} is not the key of tls_cert {cert_path}")
    now = _now()
    if leaf.not_valid_after_utc <= now:
        raise ComponentFailed(
            f"tls_cert {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    pem = layout.haproxy_pem
    # The chain as given (leaf first), then the key in a form HAProxy reads.
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(pem, chain.rstrip(b"\n") + b"\n" + key_text, 0o600)
    warning = (
        " (expires within 30 days: renew it)"
        if leaf.not_valid_after_utc - now < RENEW_BEFORE
        else ""
    )
    return TlsFiles.serving(
        leaf, pem, None, f"using the operator's certificate {cert_path}{warning}"
    )


# ---- generated certificates ------------------------------------------------------------


def _generated_files(settings: Settings, layout: Layout, renew: bool) -> TlsFiles:
    tls_dir = layout.tls_dir
    ca_pem, ca_key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    server_pem, server_key_path = tls_dir / "server.pem", tls_dir / "server.key"
    decisions = []
    ca = _load_pair(ca_pem, ca_key_path)
    if ca is None:
        ca = _new_ca(ca_pem, ca_key_path)
        decisions.append(f"made a new CA {ca_pem}")
    ca_cert, ca_key = ca
    names = wanted_names(settings)
    server = _load_pair(server_pem, server_key_path)
    why = "renewal asked for" if renew else _why_remake(server, ca_cert, names)
    if server is None or why:
        server = _new_server(ca_cert, ca_key, names, server_pem, server_key_path)
        decisions.append(f"made a new server certificate ({why or 'none yet'})")
    else:
        decisions.append("reusing the server certificate")
    cert, key = server
    pem = layout.haproxy_pem
    _write(pem, server_pem.read_bytes() + _key_bytes(key), 0o600)
    return TlsFiles.serving(cert, pem, ca_pem, "; ".join(decisions))


def _why_remake(
    server: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca_cert: x509.Certificate,
    names: tuple[str, ...],
) -> str:
    """Why the server certificate must be made again; empty when it can stay."""
    if server is None:
        return "none yet"
    cert = server[0]
    if cert.issuer != ca_cert.subject:
        return "not issued by the cluster CA"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the cluster CA"
    missing = set(names) - {_canonical(n) for n in certificate_names(cert)}
    if missing:
        return f"lacks {', '.join(sorted(missing))}"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    return ""


def _new_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix: two clusters' CAs never share a name (NSS mixes those up).
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchboard"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Switchboard cluster CA {secrets.token_hex(4)}"
            ),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_bytes(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _new_server(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    names: tuple[str, ...],
    cert_path: Path,
    key_path: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    dns = [n for n in names if not is_address(n)]
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    alt_names += [x509.IPAddress(ipaddress.ip_address(n)) for n in names if is_address(n)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchboard"),
                    x509.NameAttribute(NameOID.COMMON_NAME, (dns or ["switchboard"])[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDSA signs the handshake; there is no key to encipher (that is RSA's).
            _key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_bytes(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """A certificate and its EC key, or None when either is missing, unreadable or not
    the other's (then both are made again)."""
    try:
        cert = load_certificate(cert_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        return None
    return cert, key


# ---- small helpers ---------------------------------------------------------------------


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A KeyUsage extension with only the named uses."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _canonical(name: str) -> str:
    """Addresses in their compressed form, names in lower case: comparable with a SAN's."""
    return str(ipaddress.ip_address(name)) if is_address(name) else name.lower()


def _public_bytes(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a whole file with its mode from the start, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
