"""``fhir-server hl7 mllp --processes N``: one acceptor process handing connections to N listener processes.

One listener process is bound by the interpreter's lock: its messages are processed one at a time on one core,
however many connections they come on. With ``N`` > 1 the command's process binds the address, forks ``N``
children before it has opened anything else (no database connection, no thread, no event loop crosses the fork),
and then only accepts: each connection goes, as a file descriptor over a Unix socket pair (SCM_RIGHTS), to the child
with the fewest open connections, which serves it exactly as a single listener does (TLS handshake, ordered
messages, ACK after the commit). MLLP connections are long-lived and each one is strictly sequential (original-mode
acknowledgement), so they are spread by count, not left to whichever process wakes first.

A child tells the acceptor when a connection of its own has closed (one byte on its socket pair), so the acceptor
knows every child's load and holds the connection limit over all of them. A child that dies is replaced; the
messages it had in hand were not acknowledged, and their senders send them again (the message store takes each
one up at once, its owner being gone). On SIGTERM or SIGINT the acceptor stops accepting, passes the signal on, and
waits for every child to finish the messages in hand; a child whose acceptor disappears does the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
CLOSED = b"c"  # a child to the acceptor: one of my connections has closed
RESTART_PAUSE_SECONDS = 1.0  # a child that dies this soon after it started is replaced after this pause
STOP_GRACE_SECONDS = 90  # children get this long to finish what they hold before they are killed


def bind(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names (``localhost``: IPv4 and IPv6), all on one port."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            if sockets:  # port 0: the others take the port the first one was given
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            s = socket.socket(family, kind, proto)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(address)
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


@dataclass
class _Child:
    pid: int
    channel: socket.socket  # the acceptor's end of the socket pair
    started: float
    connections: int = 0


class Supervisor:
    """The acceptor. ``child_main(channel)`` runs in each child (after the fork) and returns its exit status."""

    def __init__(self, sockets: list[socket.socket], processes: int, child_main: Callable[[socket.socket], int], *,
                 max_connections: int) -> None:
        self.sockets = sockets
        self.processes = processes
        self.child_main = child_main
        self.max_connections = max_connections
        self.children: dict[int, _Child] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def run(self, ready: Callable[[list[tuple[str, int]]], None] | None = None) -> int:
        for _ in range(self.processes):
            self._spawn()
        wake_r, wake_w = self._wake = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        signals: list[int] = []
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        for s in self.sockets:
            self.selector.register(s, selectors.EVENT_READ, "accept")
        if ready is not None:
            ready([s.getsockname()[:2] for s in self.sockets])
        log.info("hl7 mllp acceptor up", extra={"processes": self.processes})
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=5):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            signals.extend(wake_r.recv(64))
                    elif key.data == "accept":
                        self._accept(key.fileobj)  # type: ignore[arg-type]
                    else:
                        self._note(key.data)
                if signal.SIGTERM in signals or signal.SIGINT in signals:
                    self.stopping = True
                signals.clear()
                self._reap()
            return self._stop()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()

    def _spawn(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the child: nothing of the acceptor's but its own end of the pair
            status = 1
            try:
                mine.close()
                for s in self.sockets:
                    s.close()
                for child in self.children.values():
                    child.channel.close()
                for end in self._wake or ():
                    end.close()
                self.selector.close()  # its epoll instance is the acceptor's too: closed here, never changed
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                status = self.child_main(theirs)
            except BaseException:
                log.exception("hl7 mllp listener process failed")
            finally:
                os._exit(status)
        theirs.close()
        mine.setblocking(False)
        child = _Child(pid, mine, time.monotonic())
        self.children[pid] = child
        self.selector.register(mine, selectors.EVENT_READ, pid)
        log.info("hl7 mllp listener process started", extra={"pid": pid})

    def _accept(self, listening: socket.socket) -> None:
        while True:
            try:
                conn, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next round tries again
                log.warning("hl7 mllp accept failed", extra={"error": type(exc).__name__})
                return
            with conn:
                address = str(peer[0]) if isinstance(peer, tuple) and peer else None
                total = sum(c.connections for c in self.children.values())
                if self.stopping or total >= self.max_connections or not self.children:
                    log.warning("hl7 mllp connection refused: too many", extra={"address": address})
                    continue
                for child in sorted(self.children.values(), key=lambda c: (c.connections, c.started)):
                    try:
                        socket.send_fds(child.channel, [b"n"], [conn.fileno()])
                    except OSError:  # that child is going: the next one
                        continue
                    child.connections += 1
                    break
                else:
                    log.warning("hl7 mllp connection dropped: no listener process took it", extra={"address": address})

    def _note(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            data = child.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the child is gone (reaped below)
            self.selector.unregister(child.channel)
            return
        child.connections = max(0, child.connections - data.count(CLOSED))

    def _reaped(self) -> tuple[_Child | None, int] | None:
        """A child that has exited (forgotten, with its exit status), (None, 0) for another process, None if none."""
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left at all: whatever is still listed is gone
            for gone in self.children.values():
                gone.channel.close()
            self.children.clear()
            return None
        if pid == 0:
            return None
        child = self.children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.channel)
            child.channel.close()
        return child, os.waitstatus_to_exitcode(status)

    def _reap(self) -> None:
        while self.children and (reaped := self._reaped()) is not None:
            child, code = reaped
            if child is None or self.stopping:
                continue
            log.warning("hl7 mllp listener process exited; starting another", extra={"pid": child.pid, "status": code})
            if time.monotonic() - child.started < RESTART_PAUSE_SECONDS:
                time.sleep(RESTART_PAUSE_SECONDS)
            self._spawn()

    def _stop(self) -> int:
        for s in self.sockets:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(s)
            s.close()
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        failed = 0
        while self.children:
            reaped = self._reaped()
            if reaped is None:
                if time.monotonic() > deadline:
                    for child in self.children.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child.pid, signal.SIGKILL)
                time.sleep(0.05)
                continue
            failed += reaped[0] is not None and reaped[1] != 0
        self.selector.close()
        log.info("hl7 mllp acceptor stopped")
        return 1 if failed else 0


def received_connections(channel: socket.socket) -> list[socket.socket]:
    """In a child: the connections the acceptor has sent (none when nothing is there yet); EOFError when the
    acceptor is gone."""
    out: list[socket.socket] = []
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1024, 64)
        except (BlockingIOError, InterruptedError):
            return out
        out.extend(socket.socket(fileno=fd) for fd in fds)
        if not data and not fds:
            for s in out:
                s.close()
            raise EOFError("the acceptor is gone")
