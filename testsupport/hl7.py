"""HL7 v2 for tests and benchmarks: ORU^R01 messages made to order, an MLLP client, the listener as a subprocess."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Self

from fhir_server.hl7v2 import er7, mllp

_TESTS = [  # LOINC code, name, unit, value, range
    ("718-7", "Hemoglobin", "g/dL", "13.2", "12.0-16.0"),
    ("4544-3", "Hematocrit", "%", "39.8", "36-46"),
    ("789-8", "Erythrocytes", "10*6/uL", "4.51", "4.2-5.4"),
    ("6690-2", "Leukocytes", "10*3/uL", "11.9", "4.5-11.0"),
    ("777-3", "Platelets", "10*3/uL", "250", "150-400"),
    ("787-2", "MCV", "fL", "88.2", "80-100"),
    ("785-6", "MCH", "pg", "29.3", "27-33"),
    ("786-4", "MCHC", "g/dL", "33.2", "32-36"),
    ("788-0", "Erythrocyte distribution width", "%", "13.1", "11.5-14.5"),
    ("2345-7", "Glucose", "mg/dL", "98", "70-99"),
]


def oru(n: int, *, observations: int = 10, patients: int = 100, sender: str = "LAB^2.16.840.1.113883.19.4.1^ISO",
        facility: str = "LABFAC^2.16.840.1.113883.19.4.2^ISO") -> bytes:
    """The n-th of a series of ORU^R01 (2.5.1) results: each with a control id and order numbers of its own, for one
    of ``patients`` patients, with ``observations`` numeric OBX (units, ranges, abnormal flags)."""
    p = n % patients
    obx = []
    for i in range(observations):
        code, name, unit, value, ref = _TESTS[i % len(_TESTS)]
        flag = "H" if code == "6690-2" else "N"
        obx.append(f"OBX|{i + 1}|NM|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|{ref}|{flag}|||F|||20261201083000-0500")
    segments = [
        f"MSH|^~\\&|{sender}|{facility}|EHR|HOSP|20261201090000-0500||ORU^R01^ORU_R01|BENCH{n:09d}|P|2.5.1|||AL|NE",
        (f"PID|1||MRN{p:06d}^^^HOSP&2.16.840.1.113883.19.5&ISO^MR||Testpatient^Pat{p}^Q||19700101|F|||"
         f"1 Main St^^Springfield^IL^62701^USA"),
        f"ORC|RE|PLC{n:09d}^EHR|FIL{n:09d}^LAB|||||||||1234567890^Ordering^Olivia^^^^^^NPI&2.16.840.1.113883.4.6&ISO",
        (f"OBR|1|PLC{n:09d}^EHR|FIL{n:09d}^LAB|58410-2^CBC panel^LN|||20261201080000-0500|||||||||"
         f"1234567890^Ordering^Olivia^^^^^^NPI&2.16.840.1.113883.4.6&ISO||||||20261201090000-0500|||F"),
        *obx,
    ]
    return ("\r".join(segments) + "\r").encode()


class MllpClient:
    """One MLLP connection: send messages (framed), read ACKs as they come."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 60) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        self.deframer = mllp.Deframer(max_size=64 * 1024 * 1024)
        self.waiting: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sock.sendall(mllp.frame(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ack(self) -> bytes:
        """The next ACK's bytes; ConnectionError when the connection closes first."""
        while not self.waiting:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the listener closed the connection")
            self.waiting.extend(f for f in self.deframer.feed(data) if isinstance(f, bytes))
        return self.waiting.pop(0)

    def exchange(self, message: bytes) -> bytes:
        self.send(message)
        return self.ack()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def msa(ack: bytes) -> tuple[str | None, str | None]:
    """An ACK's MSA-1 (AA, AE, AR) and MSA-2 (the control id it answers)."""
    segment = er7.parse(ack).segment("MSA")
    assert segment is not None, ack
    return segment.value(1), segment.value(2)


def start_listener(command: list[str], env: dict[str, str], log: Path, *, processes: int = 1,
                   timeout: float = 120) -> tuple[subprocess.Popen[str], int]:
    """Run ``command`` (``fhir-server`` as a list) ``hl7 mllp --tenant default --port 0 --processes N`` with ``env``
    until it says where it listens; (the process, its port). Its log goes to ``log``."""
    with open(log, "a") as err:  # the child has its own copy of the descriptor
        proc = subprocess.Popen([*command, "hl7", "mllp", "--tenant", "default", "--port", "0",
                                 "--processes", str(processes)], env=env, text=True, stdout=subprocess.PIPE, stderr=err)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise RuntimeError(f"the MLLP listener did not start: {log.read_text()[-2000:]}") from None
    if not line.startswith("listening on 127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"the MLLP listener said {line!r}")
    return proc, int(line.strip().rsplit(":", 1)[1])
