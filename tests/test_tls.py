"""TLS end to end, on a real vLLM engine: `llmwarm serve` with mutual TLS warms up and serves,
and with `--enable-ssl-refresh` a rotated certificate is served without a restart.

A throw-away CA (`trustme`) issues the server's certificate and a client's. Before the fix,
every warm-up request failed the handshake under `--ssl-cert-reqs 2` (the warm-up client had
no certificate: exit 4), and `--enable-ssl-refresh` was dropped.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trustme

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from tests.launch import MINIMAL, engine_env, wait_ready

pytestmark = pytest.mark.e2e


def _served_certificate(port: int, trust: ssl.SSLContext) -> bytes:
    """The certificate the server presents to a new connection (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_mutual_tls_warms_up_serves_and_picks_up_a_rotated_certificate(
    tiny_model: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    key, cert, ca_file = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    server.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(ca_file))
    trust = ssl.create_default_context(cafile=str(ca_file))
    client.configure_cert(trust)  # the client's certificate, for mTLS
    port = free_port()
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS, "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "tiny", "--profile", str(MINIMAL),
             "--report", str(tmp_path / "report.json"), "--ssl-keyfile", str(key),
             "--ssl-certfile", str(cert), "--ssl-ca-certs", str(ca_file),
             "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED)), "--enable-ssl-refresh"],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust, timeout=60) as c:
            wait_ready(proc, c, log)  # the warm-up ran, certificate or not
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
            assert c.post("/v1/completions", json=body).status_code == 200
        anonymous = ssl.create_default_context(cafile=str(ca_file))  # no client certificate
        with pytest.raises(httpx.TransportError):
            with httpx.Client(verify=anonymous, timeout=10) as c:
                c.get(f"https://127.0.0.1:{port}/ready")
        # rotate the server's certificate in place: new connections get the new one
        before = _served_certificate(port, trust)
        rotated = ca.issue_cert("127.0.0.1", "localhost")
        rotated.private_key_pem.write_to_path(str(key))
        rotated.cert_chain_pems[0].write_to_path(str(cert))
        new = rotated.cert_chain_pems[0].bytes()
        wanted = ssl.PEM_cert_to_DER_cert(new.decode())
        assert wanted != before
        while _served_certificate(port, trust) != wanted:  # (never: the test's timeout)
            assert proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
