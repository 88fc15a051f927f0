"""A real redis-server speaking TLS, with a private CA made for the test (cryptography).

The server keeps its plain port for its own readiness check (RedisServer.start pings it) and serves TLS
on `tls_port`; clients under test use `tls_url` (rediss://127.0.0.1:<tls_port>/0). Its certificate
names 127.0.0.1 and localhost and is signed by `ca_path`; `other_ca(dir)` makes a CA that did not sign
it (the "wrong CA" case). Needs a server built with TLS (Debian's redis-server 7.0 is); `start_or_skip()`
skips the test, saying so, on a build without it.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from redis_server import RedisServer, free_port


def _name(common_name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str = "xp-test-ca") -> tuple[Path, object, object]:
    """A self-signed CA: (its PEM file, certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def other_ca(directory: Path) -> Path:
    """A CA that signed nothing the server presents."""
    return make_ca(directory, "xp-test-other-ca")[0]


def _server_cert(directory: Path, ca_cert: object, ca_key: object) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)  # type: ignore[attr-defined]
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[attr-defined]
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    crt, pem_key = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem_key.chmod(0o600)
    return crt, pem_key


class TlsRedisServer(RedisServer):
    """A RedisServer that also serves TLS (no client certificates asked: the password authenticates)."""

    def __init__(self, *, password: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(password=password)
        self.tls_port = free_port()
        self.ca_path, ca_cert, ca_key = make_ca(self.dir)
        crt, key = _server_cert(self.dir, ca_cert, ca_key)
        self.extra_args = ("--tls-port", str(self.tls_port), "--tls-cert-file", str(crt), "--tls-key-file", str(key),
                           "--tls-ca-cert-file", str(self.ca_path), "--tls-auth-clients", "no", *extra_args)

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def start_or_skip(self) -> "TlsRedisServer":
        import pytest
        try:
            self.start()
        except RuntimeError as e:
            self.cleanup()
            pytest.skip(f"{self.binary} does not serve TLS here ({e})")
        return self
