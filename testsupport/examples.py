"""The official R4 examples copied into conformance_tests/data (see its README)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "conformance_tests" / "data" / "r4-examples"


def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.json"))


def iter_examples() -> Iterator[tuple[str, bytes]]:
    for path in example_files():
        yield path.name, path.read_bytes()
