"""``fhir-server hl7 mllp --processes N``: an acceptor handing connections to N listener processes (both back-ends).

The connections are spread over the processes by count; the connection limit holds over all of them; a listener
process that dies is replaced, and what its senders then send again is processed once; SIGTERM stops everything
after the messages in hand are acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fhir_server.settings import Settings
from testsupport.backends import DatabaseUrls
from testsupport.cli import CLI, cli_environment, run
from testsupport.engine_calls import call, resource
from testsupport.hl7 import MllpClient, msa, oru, start_listener


def _children(proc: subprocess.Popen[str], count: int, timeout: float = 60) -> list[int]:
    """The listener processes of the acceptor ``proc``, once there are ``count`` of them (read from /proc)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z":
                pids.append(int(entry))
        if len(pids) == count or time.monotonic() > deadline:
            return sorted(pids)
        time.sleep(0.1)


def _serving(pid: int, port: int) -> int:
    """How many connections to the listener's ``port`` process ``pid`` holds."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    tcp: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            tcp.update(fields[9] for fields in map(str.split, f) if int(fields[1].rsplit(":", 1)[1], 16) == port)
    return len(inodes & tcp)


def _total(env: dict[str, str], rtype: str) -> int:
    from fhir_server.cli import _engine

    engine = _engine(Settings.load(environ=env))
    try:
        return int(resource(call(engine, "default", "GET", rtype, params=(("_summary", "count"),)))["total"])
    finally:
        engine.storage.audit_log.stop()
        engine.storage.db.dispose()


def test_connections_are_spread_and_a_dead_listener_process_is_replaced(fresh_db: DatabaseUrls, tmp_path: Path) -> None:
    env = cli_environment(fresh_db, tmp_path)
    proc, port = start_listener(CLI, env, tmp_path / "listener.log", processes=2)
    try:
        first, second = _children(proc, 2)
        clients = [MllpClient("127.0.0.1", port) for _ in range(4)]
        try:
            for n, c in enumerate(clients):
                assert msa(c.exchange(oru(n))) == ("AA", f"BENCH{n:09d}")
            assert _serving(first, port) == 2 and _serving(second, port) == 2  # by count, not by who woke first

            os.kill(first, signal.SIGKILL)  # its two connections go with it
            survivor, replacement = second, None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pids = _children(proc, 2)
                if first not in pids and len(pids) == 2:
                    replacement = next(p for p in pids if p != survivor)
                    break
                time.sleep(0.1)
            assert replacement is not None, "the dead listener process was not replaced"
            answered = []
            for n, c in enumerate(clients):
                try:
                    answered.append(msa(c.exchange(oru(10 + n)))[0])
                except (ConnectionError, OSError):
                    c.close()
                    clients[n] = MllpClient("127.0.0.1", port)  # the sender reconnects and sends it again
                    answered.append(msa(clients[n].exchange(oru(10 + n)))[0])
            assert answered == ["AA"] * 4
            assert msa(clients[0].exchange(oru(10))) == ("AA", "BENCH000000010")  # a repeat: the first ACK again
        finally:
            for c in clients:
                c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    assert _children(proc, 0, timeout=0) == []
    assert _total(env, "DiagnosticReport") == 8  # each message once, the repeat not again
    assert run(env, "audit", "verify", "--tenant", "default", check=False).returncode == 0


def test_the_connection_limit_holds_over_all_processes(fresh_db: DatabaseUrls, tmp_path: Path) -> None:
    env = {**cli_environment(fresh_db, tmp_path), "FHIR_HL7_MLLP_MAX_CONNECTIONS": "2"}
    proc, port = start_listener(CLI, env, tmp_path / "listener.log", processes=2)
    try:
        with MllpClient("127.0.0.1", port) as a, MllpClient("127.0.0.1", port) as b:
            assert msa(a.exchange(oru(1)))[0] == "AA" and msa(b.exchange(oru(2)))[0] == "AA"
            with MllpClient("127.0.0.1", port, timeout=30) as c, pytest.raises((ConnectionError, OSError)):
                c.exchange(oru(3))
        deadline = time.monotonic() + 30  # the two closed: room again, once the processes have said so
        while True:
            try:
                with MllpClient("127.0.0.1", port, timeout=30) as d:
                    assert msa(d.exchange(oru(4)))[0] == "AA"
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "the closed connections were not counted as closed"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0


def test_sigterm_lets_the_message_in_hand_finish(fresh_db: DatabaseUrls, tmp_path: Path) -> None:
    env = cli_environment(fresh_db, tmp_path)
    proc, port = start_listener(CLI, env, tmp_path / "listener.log", processes=2)
    with MllpClient("127.0.0.1", port) as c:
        assert msa(c.exchange(oru(1)))[0] == "AA"  # a listener process is up and has the connection
        c.send(oru(2, observations=200))
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert msa(c.ack()) == ("AA", "BENCH000000002")
    assert proc.wait(90) == 0
    assert _total(env, "DiagnosticReport") == 2
