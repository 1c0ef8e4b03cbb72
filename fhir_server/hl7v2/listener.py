"""HL7 v2 over MLLP: a listener for one tenant (``fhir-server hl7 mllp``), on asyncio.

Each connection is read as it comes (``mllp.Deframer``: frames split over many packets, several in one, noise
between them dropped) and its messages are handled in the order they arrived, one at a time per connection, each
answered with its ACK frame before the next is taken (HL7 original-mode acknowledgement). Many connections are
served at once: their messages go to a pool of ``workers`` threads, each of which hands one message to the same
``Intake`` the HTTP endpoint uses (stored before it is processed, one transaction, ACK after the commit).

Limits: a frame larger than the maximum message size is refused (AR, error 207) without being buffered whole; a
connection that sends nothing for ``idle_seconds`` (or does not read its ACKs for that long) is closed; connections
beyond ``max_connections`` are closed as they come. A message that fails for a reason of the server's (the database
gone) is answered AR 207, which tells the sender to send it again later, and is taken up again when it comes.

Off a loopback address the listener speaks TLS only (1.2 or newer) and requires a client certificate that chains to
the configured CA (mutual TLS): the certificate's subject names the sender in the audit log. On loopback (a local
interface engine, or a TLS-terminating proxy) plain TCP is allowed.

The sender acts with the scopes ``system/*.crus`` (create, read, update, search; never delete, never the audit log).
On SIGTERM or SIGINT the listener stops accepting, lets every message in hand finish and be acknowledged, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fhir_server.hl7v2 import ack, supervisor
from fhir_server.hl7v2.er7 import Hl7Error, Location
from fhir_server.hl7v2.mllp import Deframer, FrameTooLarge, frame
from fhir_server.security import audit_events as ae
from fhir_server.security.access import AccessContext
from fhir_server.security.scopes import parse_scopes

if TYPE_CHECKING:
    from fhir_server.hl7v2.intake import Intake

log = logging.getLogger(__name__)
SCOPES = "system/*.crus"
READ_SIZE = 64 * 1024
SHUTDOWN_GRACE_SECONDS = 60


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """Server TLS (1.2 or newer) that requires a client certificate chaining to ``client_ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _subject(cert: dict[str, Any] | None) -> str | None:
    """A client certificate's common name (or its whole subject when it has none)."""
    if not cert:
        return None
    names = [(k, v) for rdn in cert.get("subject", ()) for k, v in rdn]
    common = [v for k, v in names if k == "commonName"]
    return (common[0] if common else ",".join(f"{k}={v}" for k, v in names))[:200] or None


@dataclass(slots=True)
class _Connection:
    address: str | None
    access: AccessContext
    busy: bool = False  # a message of it is in hand (shutdown waits for it)


class Listener:
    def __init__(self, intake: Intake, tenant: str, base_url: str, *, max_bytes: int, idle_seconds: float,
                 workers: int, max_connections: int, tls: ssl.SSLContext | None = None) -> None:
        self.intake, self.tenant, self.base_url = intake, tenant, base_url
        self.max_bytes, self.idle_seconds, self.max_connections = max_bytes, idle_seconds, max_connections
        self.tls = tls
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mllp")
        self.connections: dict[asyncio.Task[None], _Connection] = {}
        self.closing = False
        self.messages = 0  # frames answered, for the log at shutdown
        self.on_close: Callable[[], None] | None = None  # a connection has ended (handed connections: tell the acceptor)
        self.adopting: set[asyncio.Task[None]] = set()  # handed connections in their TLS handshake

    async def run(self, host: str, port: int, *, ready: Callable[[list[tuple[str, int]]], None] | None = None,
                  stop: asyncio.Event | None = None, signals: bool = False) -> None:
        """Serve until ``stop`` is set (or SIGTERM/SIGINT with ``signals``); ``ready`` gets the bound addresses."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        if signals:
            _stop_on_signals(loop, stop)
        server = await asyncio.start_server(self._serve_connection, host, port, ssl=self.tls, limit=READ_SIZE,
                                            ssl_handshake_timeout=30 if self.tls else None, backlog=1024)
        bound = [s.getsockname()[:2] for s in server.sockets]
        log.info("hl7 mllp listening", extra={"addresses": [f"{h}:{p}" for h, p in bound],
                                                          "tls": self.tls is not None, "tenant": self.tenant})
        if ready is not None:
            ready(bound)
        try:
            await stop.wait()
        finally:
            await self._shut_down(server)

    async def run_handed(self, channel: socket.socket, *, signals: bool = False) -> None:
        """Serve the connections that the acceptor (``supervisor.py``) hands over ``channel``, until SIGTERM or
        SIGINT (with ``signals``) or until the acceptor is gone; each is answered, on closing, by a note to it."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if signals:
            _stop_on_signals(loop, stop)
        channel.setblocking(False)

        def closed() -> None:
            with contextlib.suppress(OSError):
                channel.send(supervisor.CLOSED)

        def handed() -> None:
            try:
                connections = supervisor.received_connections(channel)
            except EOFError:
                loop.remove_reader(channel.fileno())
                stop.set()
                return
            for sock in connections:
                task = loop.create_task(self._adopt(sock, closed))
                self.adopting.add(task)
                task.add_done_callback(self.adopting.discard)

        self.on_close = closed
        loop.add_reader(channel.fileno(), handed)
        log.info("hl7 mllp listener process ready", extra={"tls": self.tls is not None, "tenant": self.tenant})
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(channel.fileno())
            await self._shut_down(None)

    async def _adopt(self, sock: socket.socket, closed: Callable[[], None]) -> None:
        """A connection accepted by the acceptor, served as if accepted here (the TLS handshake first)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE)
        protocol = asyncio.StreamReaderProtocol(reader, self._serve_connection)
        try:
            await loop.connect_accepted_socket(lambda: protocol, sock, ssl=self.tls,
                                               ssl_handshake_timeout=30 if self.tls else None)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("hl7 mllp connection ended", extra={"why": type(exc).__name__})
            sock.close()
            closed()

    async def _shut_down(self, server: asyncio.Server | None) -> None:
        self.closing = True
        if server is not None:
            server.close()
        for task, conn in list(self.connections.items()):
            if not conn.busy:  # waiting for the sender: nothing in hand
                task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=SHUTDOWN_GRACE_SECONDS)
        for task in list(self.connections):
            task.cancel()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.pool.shutdown(wait=True)
        log.info("hl7 mllp stopped", extra={"messages": self.messages, "tenant": self.tenant})

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._connection(reader, writer)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if self.closing or len(self.connections) >= self.max_connections:
            log.warning("hl7 mllp connection refused: too many", extra={"address": address})
            await _close(writer)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sender = _subject(writer.get_extra_info("peercert"))
        access = AccessContext(parse_scopes(SCOPES), client_id=f"mllp:{sender}" if sender else "mllp",
                               subject=sender or "mllp")
        conn = _Connection(address, access)
        self.connections[task] = conn
        try:
            await self._converse(reader, writer, conn)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("hl7 mllp connection ended", extra={"address": address, "why": type(exc).__name__})
        except asyncio.CancelledError:  # shutting down while the sender was silent: nothing in hand to finish
            pass
        finally:
            del self.connections[task]
            await _close(writer)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        deframer = Deframer(self.max_bytes)
        while not self.closing:
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), self.idle_seconds)
            except TimeoutError:
                log.info("hl7 mllp connection idle: closed", extra={"address": conn.address})
                return
            if not data:
                if deframer.inside:  # the sender never got an ACK for it, and sends it again
                    log.info("hl7 mllp connection closed inside a frame", extra={"address": conn.address})
                return
            for item in deframer.feed(data):
                conn.busy = True
                try:
                    reply = await loop.run_in_executor(self.pool, self._handle, item, conn)
                finally:
                    conn.busy = False
                self.messages += 1
                writer.write(frame(reply))
                await asyncio.wait_for(writer.drain(), self.idle_seconds)

    def _handle(self, item: bytes | FrameTooLarge, conn: _Connection) -> bytes:
        """One frame's ACK (in a pool thread)."""
        ae.set_origin(ae.Origin(conn.address, str(uuid.uuid4())))
        try:
            if isinstance(item, FrameTooLarge):
                error = Hl7Error("207", f"the message is larger than {item.limit} bytes, the most this server takes; "
                                        "send it in parts (a batch as smaller batches)", Location("MSH"), reject=True)
                return self.intake.refuse(self.tenant, self.base_url, conn.access, item.head, error)
            return self.intake.receive(self.tenant, self.base_url, conn.access, item).data
        except Exception as exc:  # noqa: BLE001 - ours, not the message's: AR tells the sender to send it later
            log.error("hl7 mllp message not processed", extra={"error": type(exc).__name__,
                                                                          "address": conn.address})
            head = item.head if isinstance(item, FrameTooLarge) else item[:4096]
            original = ack.Original.salvage(head)
            error = Hl7Error("207", "the server could not process the message now; send it again later",
                             Location("MSH"), reject=True)
            return ack.encode(ack.build(original, ack.REJECT, (error,)), original)
        finally:
            ae.set_origin(None)


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)
