"""https delivery pinned to an IP still verifies the certificate for the original host name."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.webhooks.ssrf import SafeWebhookClient
from tests.unit.webhooks.conftest import FakeDNS

NAME = "hooks.example.test"


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer: x509.Name | None,
    ca: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate and its key; self-signed when ``issuer_key`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    signer = issuer_key or key
    return builder.sign(signer, hashes.SHA256()), key


@dataclass
class TLSServer:
    port: int
    client_context: ssl.SSLContext
    sni: list[str | None] = field(default_factory=list)
    hosts: list[str | None] = field(default_factory=list)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSServer]:
    ca_cert, ca_key = _cert("loraplex test CA", None, None, ca=True)
    leaf, leaf_key = _cert(NAME, ca_key, ca_cert.subject, ca=False)
    cert_file = tmp_path / "leaf.pem"
    key_file = tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    client_context = ssl.create_default_context(
        cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    state = TLSServer(0, client_context)

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)

    def sni_callback(_sock: Any, server_name: str | None, _ctx: Any) -> None:
        state.sni.append(server_name)

    server_context.sni_callback = sni_callback

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.hosts.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # failed handshakes are expected in these tests

    server = Server(("127.0.0.1", 0), Handler)
    server.socket = server_context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_https_pinned_to_ip_verifies_the_original_name(
    tls_server: TLSServer, fake_dns: FakeDNS
) -> None:
    fake_dns.add(NAME, ["127.0.0.1"])
    client = SafeWebhookClient(allow_hosts=NAME, verify=tls_server.client_context)
    with client:
        result = client.post(f"https://{NAME}:{tls_server.port}/hook", b"{}", {})
    assert result.ok, result
    assert result.address == "127.0.0.1"
    assert tls_server.sni == [NAME]
    assert tls_server.hosts == [f"{NAME}:{tls_server.port}"]


def test_certificate_for_another_name_is_refused(tls_server: TLSServer, fake_dns: FakeDNS) -> None:
    fake_dns.add("other.example.test", ["127.0.0.1"])
    allow = "other.example.test,127.0.0.1"
    with SafeWebhookClient(allow_hosts=allow, verify=tls_server.client_context) as client:
        by_name = client.post(f"https://other.example.test:{tls_server.port}/", b"{}", {})
        by_ip = client.post(f"https://127.0.0.1:{tls_server.port}/", b"{}", {})
    for result in (by_name, by_ip):
        assert not result.ok
        assert result.status_code is None
        assert result.error is not None
        assert result.error.startswith("TLS error"), result.error
        assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert tls_server.hosts == []
