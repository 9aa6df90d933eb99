"""Fixtures shared by the transport tests: a federation's real certificates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from fedcare.transport import pki


def issue_federation_certs(directory: Path, node_names: Iterable[str]) -> Path:
    """A CA, a server certificate for 127.0.0.1 and one node certificate per name, in ``directory``."""
    pki.init_ca(directory, federation="test")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("127.0.0.1",))
    for name in node_names:
        pki.issue_certificate(directory, role="node", name=name)
    return directory


@pytest.fixture
def federation_certs(tmp_path: Path) -> Callable[[Iterable[str]], Path]:
    """Call with node names; returns a certificates directory holding them all."""

    def issue(node_names: Iterable[str]) -> Path:
        return issue_federation_certs(tmp_path / "certs", node_names)

    return issue
