"""Fixtures shared by tests/ and conformance_tests/: the PostgreSQL provisioner and the back-end report."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testsupport.backends import PostgresProvisioner, postgres_fixture, terminal_summary


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresProvisioner]:
    yield from postgres_fixture()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminal_summary(terminalreporter)
