"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 2): <VT> message <FS><CR> on a byte stream.

``Deframer`` takes the stream as it arrives, in pieces of any size: a frame split across many reads, several frames in
one read, bytes outside any frame (line noise, keep-alive newlines) dropped. A frame larger than the limit is refused
as it grows, before it is buffered whole, and the rest of it is skipped up to its end.
"""

from __future__ import annotations

from dataclasses import dataclass

START = b"\x0b"
END = b"\x1c\x0d"
_START, _FS, _CR = 0x0B, 0x1C, 0x0D


def frame(payload: bytes) -> bytes:
    return START + payload + END


HEAD = 4096  # what of a frame too large is kept: enough for its MSH, to address the rejection


class FrameTooLarge(Exception):  # reported (returned by feed), not raised
    def __init__(self, limit: int, head: bytes = b"") -> None:
        super().__init__(f"an MLLP frame larger than {limit} bytes")
        self.limit = limit
        self.head = head  # the frame's first bytes


@dataclass(slots=True)
class Deframer:
    max_size: int = 10 * 1024 * 1024
    _buffer: bytearray | None = None  # inside a frame: its payload so far
    _skipping: bool = False  # inside a frame that was too large: dropped up to its end
    _after_fs: bool = False  # the last byte seen was <FS> (its <CR> may come in the next read)
    dropped: int = 0  # bytes seen outside any frame, or in frames that never ended

    def feed(self, data: bytes) -> list[bytes | FrameTooLarge]:
        """What ``data`` completes, in order: the payload of each frame that ends in it, and a FrameTooLarge (not
        raised) for a frame that grew past the limit (what remains of that frame is skipped)."""
        out: list[bytes | FrameTooLarge] = []
        i, n = 0, len(data)
        if self._after_fs and n:
            self._after_fs = False
            if data[0] == _CR:
                i = 1
        while i < n:
            if self._buffer is None and not self._skipping:
                start = data.find(START, i)
                if start < 0:
                    self.dropped += n - i
                    break
                self.dropped += start - i
                self._buffer = bytearray()
                i = start + 1
                continue
            end = data.find(b"\x1c", i)
            restart = data.find(START, i, end if end >= 0 else n)
            if restart >= 0:  # a new frame begins before this one ended: this one was cut off
                self.dropped += (len(self._buffer) if self._buffer is not None else 0) + restart - i
                self._buffer, self._skipping = None, False
                i = restart
                continue
            chunk_end = end if end >= 0 else n
            if self._buffer is not None:
                if len(self._buffer) + chunk_end - i > self.max_size:
                    head = (bytes(self._buffer[:HEAD]) + data[i:i + HEAD])[:HEAD]
                    self.dropped += len(self._buffer)
                    self._buffer, self._skipping = None, True
                    out.append(FrameTooLarge(self.max_size, head))
                else:
                    self._buffer += data[i:chunk_end]
            if self._skipping:
                self.dropped += chunk_end - i
            if end < 0:
                break
            payload = self._buffer
            self._buffer, self._skipping = None, False
            i = self._after_end(data, end)
            if payload is not None:
                out.append(bytes(payload))
        return out

    def _after_end(self, data: bytes, end: int) -> int:
        if end + 1 < len(data):
            return end + 2 if data[end + 1] == _CR else end + 1
        self._after_fs = True
        return end + 1

    @property
    def inside(self) -> bool:
        """A frame has begun and not ended (a connection closed now cuts it off)."""
        return self._buffer is not None or self._skipping
