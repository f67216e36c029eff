"""TLS at the edge without a cluster: the settings, the rendered HAProxy config, and
the certificates app/cluster/tls.py makes (names, key usages, reuse, operator files)."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.cluster import haproxy, tls
from app.cluster.errors import ComponentFailed
from app.cluster.layout import Layout
from app.settings import Settings, SettingsError
from tests.unit.test_haproxy_config import section


def render(tmp_path: Path, name: str = "haproxy", **values: object) -> str:
    s = Settings(state_dir=tmp_path, **values)  # type: ignore[arg-type]
    return haproxy.render(s, Layout.for_settings(s), name)


def binds(config: str, header: str) -> list[str]:
    return [line.strip() for line in section(config, header).splitlines() if "bind " in line]


# ---- settings and config ---------------------------------------------------------------


def test_by_default_tls_is_public_and_plaintext_loopback_only(tmp_path: Path) -> None:
    pem = tmp_path.resolve() / "tls" / "haproxy.pem"
    config = render(tmp_path, host="0.0.0.0")
    assert binds(config, "frontend clients") == [
        "bind 127.0.0.1:5222 tcp-ut 90s",
        f"bind 0.0.0.0:5223 tcp-ut 90s ssl crt {pem} ssl-min-ver TLSv1.2",
    ]
    # One frontend: the per-address caps count a client's connections on both ports.
    clients = section(config, "frontend clients")
    assert clients.count("tcp-request connection track-sc0 src,ipmask(32,64)") == 1


@pytest.mark.parametrize(
    ("values", "plain", "tls_at"),
    [
        ({}, "127.0.0.1", "127.0.0.1"),
        ({"public_host": "203.0.113.7"}, "127.0.0.1", "203.0.113.7"),
        ({"public_host": "2001:db8::7"}, "::1", "2001:db8::7"),
        ({"host": "::1"}, "::1", "::1"),
        ({"public_host": "203.0.113.7", "allow_plaintext_public": True}, "203.0.113.7", None),
    ],
)
def test_where_each_client_port_binds(
    tmp_path: Path, values: dict[str, object], plain: str, tls_at: str | None
) -> None:
    s = Settings(state_dir=tmp_path, **values)  # type: ignore[arg-type]
    assert s.plaintext_bind_host() == plain
    assert s.public_bind_host() == (tls_at or plain)
    lines = binds(render(tmp_path, "haproxy", **values), "frontend clients")
    assert lines[0].startswith(f"bind {plain}:5222 ")
    assert lines[1].startswith(f"bind {tls_at or plain}:5223 ")
    assert s.plaintext_is_public() == bool(values.get("allow_plaintext_public"))


def test_every_haproxy_process_serves_tls(tmp_path: Path) -> None:
    """The extra processes (haproxy2, ...) bind the TLS port too, with the same PEM."""
    first, second = render(tmp_path), render(tmp_path, "haproxy2")
    assert binds(second, "frontend clients") == binds(first, "frontend clients")
    assert "ssl-default-bind-ciphersuites" in second
    assert "frontend dashboard" not in second


def test_modern_ciphers_only(tmp_path: Path) -> None:
    config = render(tmp_path)
    ciphers = next(line for line in config.splitlines() if "ssl-default-bind-ciphers " in line)
    suites = ciphers.split()[-1].split(":")
    assert suites and all(c.startswith("ECDHE-") for c in suites)
    assert all("GCM" in c or "CHACHA20" in c for c in suites)
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets" in config


def test_the_dashboard_is_https_with_hsts_by_default(tmp_path: Path) -> None:
    pem = tmp_path.resolve() / "tls" / "haproxy.pem"
    dashboard = section(render(tmp_path), "frontend dashboard")
    assert f"bind 127.0.0.1:8080 ssl crt {pem}" in dashboard
    hsts = 'http-response set-header Strict-Transport-Security "max-age=63072000" if { ssl_fc }'
    assert hsts in dashboard
    plain = section(render(tmp_path, dashboard_tls=False), "frontend dashboard")
    assert "bind 127.0.0.1:8080\n" in plain + "\n"
    own = section(render(tmp_path, dashboard_tls_pem="/etc/ssl/admin.pem"), "frontend dashboard")
    assert "bind 127.0.0.1:8080 ssl crt /etc/ssl/admin.pem" in own


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"client_tls_port": 5222}, "must differ"),
        ({"tls_cert": "/x.pem"}, "go together"),
        ({"tls_key": "/x.key"}, "go together"),
        ({"tls_names": "chat.example.com, not a name"}, "not a DNS name"),
        ({"client_tls_port": 0}, "TCP port"),
    ],
)
def test_tls_settings_are_checked(values: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_tls_settings_load_from_the_environment() -> None:
    s = Settings.load(
        env={
            "SWITCHBOARD_CLIENT_TLS_PORT": "6223",
            "SWITCHBOARD_ALLOW_PLAINTEXT_PUBLIC": "true",
            "SWITCHBOARD_TLS_NAMES": "chat.example.com,198.51.100.4",
            "SWITCHBOARD_DASHBOARD_TLS": "false",
        }
    )
    assert (s.client_tls_port, s.allow_plaintext_public, s.dashboard_tls) == (6223, True, False)
    assert s.tls_name_list() == ("chat.example.com", "198.51.100.4")
    assert "client_tls_port" in s.all_ports()


# ---- generated certificates ------------------------------------------------------------


def test_generated_ca_and_server_certificate(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, public_host="203.0.113.7", tls_names="chat.example.com")
    certs = tls.ensure_certificates(s)
    tls_dir = tmp_path.resolve() / "tls"
    assert certs.ca_file == tls_dir / "ca.pem"
    ca = tls.load_certificate(tls_dir / "ca.pem")
    server = tls.load_certificate(tls_dir / "server.pem")

    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=3000)

    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    public_key = server.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    server.verify_directly_issued_by(ca)
    validity = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=360) < validity < datetime.timedelta(days=370)

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "chat.example.com"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "203.0.113.7")
    }

    # Keys and HAProxy's combined file are the owner's alone; the CA is for everyone.
    for name in ("ca.key", "server.key", "haproxy.pem"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tls_dir / "ca.pem").stat().st_mode) == 0o644
    combined = (tls_dir / "haproxy.pem").read_bytes()
    assert combined.startswith((tls_dir / "server.pem").read_bytes())
    assert b"PRIVATE KEY" in combined


def test_certificates_are_reused_and_remade_when_due(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    first = tls.ensure_certificates(s)
    again = tls.ensure_certificates(s)
    assert again.serial == first.serial and again.decision == "reusing the server certificate"
    ca_before = (tmp_path / "tls" / "ca.pem").read_bytes()

    named = tls.ensure_certificates(s.replace(tls_names="chat.example.com"))
    assert named.serial != first.serial and "lacks chat.example.com" in named.decision
    assert "chat.example.com" in named.names

    renewed = tls.ensure_certificates(s.replace(tls_names="chat.example.com"), renew=True)
    assert renewed.serial != named.serial and "renewal asked for" in renewed.decision
    # The CA stays: clients that trust it keep trusting the new certificates.
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == ca_before
    assert renewed.ca_file is not None


def test_a_certificate_near_its_end_is_remade(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    tls.ensure_certificates(s)
    tls_dir = tmp_path / "tls"
    ca = tls.load_certificate(tls_dir / "ca.pem")
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    key = serialization.load_pem_private_key((tls_dir / "server.key").read_bytes(), None)
    old = tls.load_certificate(tls_dir / "server.pem")
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=300))
        .not_valid_after(now + datetime.timedelta(days=3))
    )
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expiring = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (tls_dir / "server.pem").write_bytes(expiring.public_bytes(serialization.Encoding.PEM))
    again = tls.ensure_certificates(s)
    assert again.serial != expiring.serial_number and "expires" in again.decision


# ---- operator certificates -------------------------------------------------------------


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_operator_certificates_are_combined_for_haproxy(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "chat.example.com")
    s = Settings(state_dir=tmp_path / "state", tls_cert=str(cert), tls_key=str(key))
    certs = tls.ensure_certificates(s)
    assert certs.ca_file is None and certs.names == ("chat.example.com",)
    assert "operator" in certs.decision
    combined = certs.haproxy_pem.read_bytes()
    assert combined.startswith(cert.read_bytes().rstrip(b"\n"))
    assert b"PRIVATE KEY" in combined
    assert stat.S_IMODE(certs.haproxy_pem.stat().st_mode) == 0o600
    assert not (tmp_path / "state" / "tls" / "ca.pem").exists()


def test_an_operator_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path, "a.example.com")
    _, other_key = _self_signed(tmp_path, "b.example.com")
    s = Settings(state_dir=tmp_path / "state", tls_cert=str(cert), tls_key=str(other_key))
    with pytest.raises(ComponentFailed, match="is not the key of"):
        tls.ensure_certificates(s)
    missing = s.replace(tls_cert=str(tmp_path / "nope.pem"))
    with pytest.raises(ComponentFailed, match="cannot use tls_cert"):
        tls.ensure_certificates(missing)
