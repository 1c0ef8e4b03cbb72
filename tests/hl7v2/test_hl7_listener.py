"""HL7 v2 over MLLP (both back-ends): the listener in this process, spoken to over real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fhir_server.engine.engine import Engine
from fhir_server.hl7v2 import er7, mllp
from fhir_server.hl7v2.intake import Intake
from fhir_server.hl7v2.listener import Listener, is_loopback, tls_context
from testsupport.engine_calls import call, resource
from testsupport.hl7 import MllpClient, msa, oru

SAMPLES = Path(__file__).parent.parent / "data" / "hl7v2"
STREAM = (SAMPLES / "d3_mllp_stream_two_messages.bin").read_bytes()


@contextlib.contextmanager
def listening(engine: Engine, tenant: str, intake: Intake | None = None, **options: Any) -> Iterator[Listener]:
    """A listener on a free loopback port, served by an event loop in a thread of its own; stopped on exit."""
    kw: dict[str, Any] = {"max_bytes": 10 * 1024 * 1024, "idle_seconds": 30.0, "workers": 3, "max_connections": 100}
    kw.update(options)
    listener = Listener(intake or Intake(engine), tenant, f"http://test/fhir/{tenant}", **kw)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    bound: list[tuple[str, int]] = []
    ready = threading.Event()
    failed: list[BaseException] = []

    def on_ready(addresses: list[tuple[str, int]]) -> None:
        bound.extend(addresses)
        ready.set()

    def serve() -> None:
        try:
            loop.run_until_complete(listener.run("127.0.0.1", 0, ready=on_ready, stop=stop))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30) and not failed, failed
    listener.port = bound[0][1]  # type: ignore[attr-defined]
    try:
        yield listener
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
        assert not failed, failed


def client(listener: Listener, **kw: Any) -> MllpClient:
    return MllpClient("127.0.0.1", listener.port, **kw)  # type: ignore[attr-defined]


def count(engine: Engine, tenant: str, rtype: str, **params: str) -> int:
    body = resource(call(engine, tenant, "GET", rtype, params=(*params.items(), ("_summary", "count"))))
    return int(body["total"])


def test_the_two_frame_stream_in_one_write(engine: Engine, tenant: str) -> None:
    with listening(engine, tenant) as listener, client(listener) as c:
        c.send_raw(STREAM)
        acks = [c.ack(), c.ack()]
    assert [msa(a) for a in acks] == [("AA", "4637382"), ("AA", "20251014154001-425")]
    assert count(engine, tenant, "Patient") >= 1 and count(engine, tenant, "DiagnosticReport") == 1


def test_frames_split_anywhere_and_several_in_a_packet(engine: Engine, tenant: str) -> None:
    """Three copies of the stream (6 frames, the repeats answered from the store) cut at random places, with noise
    between frames; every frame is answered, in order."""
    messages = [oru(i) for i in range(3)]
    data = b"\r\n".join(mllp.frame(m) for m in messages) + STREAM + b"\n" + STREAM
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    with listening(engine, tenant) as listener, client(listener) as c:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            c.send_raw(data[a:b])
            time.sleep(0.002)
        acks = [msa(c.ack()) for _ in range(7)]
    assert acks == [("AA", "BENCH000000000"), ("AA", "BENCH000000001"), ("AA", "BENCH000000002"),
                    ("AA", "4637382"), ("AA", "20251014154001-425"), ("AA", "4637382"), ("AA", "20251014154001-425")]
    assert count(engine, tenant, "DiagnosticReport") == 4  # the repeated ORU changed nothing


def test_a_five_megabyte_message(engine: Engine, tenant: str) -> None:
    document = os.urandom(3_900_000)
    text = base64.b64encode(document).decode()
    message = "\r".join([
        "MSH|^~\\&|DOCS|HOSP|EHR|HOSP|20261201090000-0500||MDM^T02^MDM_T02|BIG0001|P|2.5.1",
        "EVN|T02|20261201090000-0500",
        "PID|1||MRN900001^^^HOSP&2.16.840.1.113883.19.5&ISO^MR||Large^Lara||19800101|F",
        "PV1|1|O",
        "TXA|1|CN|AP|20261201085000-0500|||||||DOC900001^DOCS||||||AU",
        f"OBX|1|ED|11488-4^Consult note^LN||^application^pdf^Base64^{text}||||||F",
    ]).encode() + b"\r"
    assert len(message) > 5_000_000
    with listening(engine, tenant) as listener, client(listener) as c:
        assert msa(c.exchange(message)) == ("AA", "BIG0001")
    [doc] = [e["resource"] for e in resource(call(engine, tenant, "GET", "DocumentReference")).get("entry", [])]
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]) == document


def test_a_frame_over_the_limit_is_refused_and_the_connection_goes_on(engine: Engine, tenant: str) -> None:
    big = oru(1, observations=400)
    with listening(engine, tenant, max_bytes=16 * 1024) as listener, client(listener) as c:
        assert len(big) > 16 * 1024
        code, control = msa(c.exchange(big))
        refusal = er7.parse(c.exchange(oru(1, observations=400)))  # again: still refused, nothing stored
        assert msa(c.exchange(oru(2))) == ("AA", "BENCH000000002")
    assert (code, control) == ("AR", "BENCH000000001")
    err = refusal.segment("ERR")
    assert err is not None and err.value(3) == "207"
    assert count(engine, tenant, "DiagnosticReport") == 1


def test_fifty_connections_at_once(engine: Engine, tenant: str) -> None:
    def sender(k: int) -> list[tuple[str | None, str | None]]:
        with client(listener) as c:
            return [msa(c.exchange(oru(1000 + 2 * k + j))) for j in range(2)]

    with listening(engine, tenant, workers=3) as listener, ThreadPoolExecutor(50) as pool:
        results = list(pool.map(sender, range(50)))
    assert all(r == [("AA", f"BENCH{1000 + 2 * k:09d}"), ("AA", f"BENCH{1001 + 2 * k:09d}")]
               for k, r in enumerate(results)), results
    assert count(engine, tenant, "DiagnosticReport") == 100
    assert count(engine, tenant, "Observation") == 1000
    assert count(engine, tenant, "Provenance") == 100


def test_an_idle_connection_is_closed(engine: Engine, tenant: str) -> None:
    with listening(engine, tenant, idle_seconds=0.5) as listener, client(listener) as c:
        assert msa(c.exchange(oru(3))) == ("AA", "BENCH000000003")
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            c.ack()
        assert time.monotonic() - started < 10


def test_connections_over_the_limit_are_closed(engine: Engine, tenant: str) -> None:
    with listening(engine, tenant, max_connections=2) as listener:
        with client(listener) as a, client(listener) as b:
            assert msa(a.exchange(oru(4)))[0] == "AA" and msa(b.exchange(oru(5)))[0] == "AA"
            with client(listener) as third, pytest.raises(ConnectionError):
                third.exchange(oru(6))
        deadline = time.monotonic() + 10  # room again, once the listener has seen the two close
        while listener.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        with client(listener) as d:
            assert msa(d.exchange(oru(6)))[0] == "AA"


def test_a_server_failure_is_ar_and_the_message_is_taken_up_when_sent_again(engine: Engine, tenant: str) -> None:
    intake = Intake(engine)
    real = intake._process
    calls = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("the database went away")
        return real(*args, **kwargs)

    intake._process = failing_once  # type: ignore[method-assign]
    with listening(engine, tenant, intake=intake) as listener, client(listener) as c:
        first = c.exchange(oru(7))
        assert msa(first) == ("AR", "BENCH000000007")
        err = er7.parse(first).segment("ERR")
        assert err is not None and err.value(3) == "207"
        assert count(engine, tenant, "DiagnosticReport") == 0
        assert msa(c.exchange(oru(7))) == ("AA", "BENCH000000007")  # at once: the failed attempt let it go
    assert count(engine, tenant, "DiagnosticReport") == 1
    [stored] = list(intake.store.listing(tenant))
    assert stored.status == "processed" and stored.attempts == 2


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("::")
    assert not is_loopback("mllp.example.org")


# --- mutual TLS ------------------------------------------------------------------------------------------------


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0] if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the listener's certificate (localhost) and two senders' certificates: one of the CA, one self-signed."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test HL7 CA", ca_key, None, ca=True)
    _write(d / "ca", ca, ca_key)
    issuer = (ca.subject, ca_key)
    for name, subject, signer, server in (("server", "localhost", issuer, True), ("lab", "lab-interface-7", issuer, False),
                                          ("stranger", "stranger", None, False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, _cert(subject, key, signer, server=server), key)
    return d


def _client_tls(pki: Path, who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if who:
        context.load_cert_chain(str(pki / f"{who}.crt"), str(pki / f"{who}.key"))
    return context


def test_mutual_tls(engine: Engine, tenant: str, pki: Path) -> None:
    tls = tls_context(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    with listening(engine, tenant, tls=tls) as listener:
        port = listener.port  # type: ignore[attr-defined]
        with MllpClient("localhost", port, tls=_client_tls(pki, "lab")) as c:
            assert msa(c.exchange(oru(8))) == ("AA", "BENCH000000008")
        for who in (None, "stranger"):  # no certificate, or one of no CA the listener trusts
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
                    MllpClient("localhost", port, tls=_client_tls(pki, who)) as c:
                c.exchange(oru(9))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:  # no TLS at all
            plain.sendall(mllp.frame(oru(9)))
            with contextlib.suppress(ConnectionError):
                assert b"MSA" not in plain.recv(65536)
    assert count(engine, tenant, "DiagnosticReport") == 1
    engine.storage.audit_log.catch_up(tenant)
    events = [e["resource"] for e in resource(call(engine, tenant, "GET", "AuditEvent",
                                                   params=(("subtype", "hl7v2-message"),))).get("entry", [])]
    assert events, "the receipt is in the audit log"
    agents = {a.get("who", {}).get("identifier", {}).get("value") for e in events for a in e.get("agent", [])}
    assert "mllp:lab-interface-7" in agents


def test_handed_connections_mutual_tls_and_the_acceptor_gone(engine: Engine, tenant: str, pki: Path) -> None:
    """``run_handed`` (a listener process of ``--processes``): connections passed over the socket pair get the TLS
    handshake here, each one's end is reported back, and the listener stops when the acceptor's end closes."""
    from fhir_server.hl7v2 import supervisor

    tls = tls_context(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    listener = Listener(Intake(engine), tenant, f"http://test/fhir/{tenant}", max_bytes=1024 * 1024, idle_seconds=30.0,
                        workers=2, max_connections=100, tls=tls)
    [listening_socket] = supervisor.bind("127.0.0.1", 0)
    listening_socket.setblocking(True)
    port = listening_socket.getsockname()[1]
    acceptor_end, listener_end = socket.socketpair()
    loop = asyncio.new_event_loop()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(listener.run_handed(listener_end))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failed.append(exc)

    def accept(n: int) -> None:
        for _ in range(n):
            conn, _ = listening_socket.accept()
            with conn:
                socket.send_fds(acceptor_end, [b"n"], [conn.fileno()])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    acceptor = threading.Thread(target=accept, args=(3,), daemon=True)
    acceptor.start()
    try:
        with MllpClient("localhost", port, tls=_client_tls(pki, "lab")) as c:
            assert msa(c.exchange(oru(8))) == ("AA", "BENCH000000008")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
                MllpClient("localhost", port, tls=_client_tls(pki, "stranger")) as c:
            c.exchange(oru(9))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:  # no TLS at all
            plain.sendall(mllp.frame(oru(9)))
            with contextlib.suppress(ConnectionError):
                assert b"MSA" not in plain.recv(65536)
        acceptor.join(30)
        acceptor_end.settimeout(30)
        notes = b""
        while notes.count(supervisor.CLOSED) < 3:  # every connection handed over was reported closed
            notes += acceptor_end.recv(64)
        assert notes == supervisor.CLOSED * 3
    finally:
        acceptor_end.close()  # the acceptor gone: the listener process stops
        listening_socket.close()
        thread.join(60)
        loop.close()
    assert not thread.is_alive() and not failed, failed
    assert count(engine, tenant, "DiagnosticReport") == 1
