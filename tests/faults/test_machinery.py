"""The suite's own failure paths: a missing binary skips (fails in CI), a node that cannot
start says why. No broker needed: fake ``rabbitmq-server`` scripts stand in."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from tests.faults import conftest as faults
from tests.faults import rabbitnode
from tests.faults.rabbitnode import RabbitNode, RabbitNodeError


def test_a_missing_binary_skips_on_a_laptop_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="rabbitmq-server not found"):
        faults.missing("rabbitmq-server")
    monkeypatch.setattr(faults, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="rabbitmq-server is required in CI"):
        faults.missing("rabbitmq-server")


def test_no_rabbitmq_binaries_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rabbitnode, "_PACKAGE_BIN", tmp_path / "nowhere")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert rabbitnode.rabbitmq_binaries() is None
    with pytest.raises(RabbitNodeError, match="not found"):
        RabbitNode(tmp_path / "node")


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_a_node_that_exits_at_start_raises_with_its_output(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "rabbitmq-server", 'echo "boom: cannot start node $RABBITMQ_NODENAME"\n'
                                         "exit 1")
    _script(bin_dir / "rabbitmqctl", "exit 69")
    node = RabbitNode(tmp_path / "node", bin_dir=bin_dir)
    # its own name, ports and files, never the shared node's
    assert node.name.startswith("herald-fault-") and node.port != 5672
    assert node.env["RABBITMQ_MNESIA_BASE"].startswith(str(tmp_path))
    assert f"127.0.0.1:{node.port}" in (tmp_path / "node" / "rabbitmq.conf").read_text()
    with pytest.raises(RabbitNodeError, match="exited while starting") as failed:
        node.start(timeout=20)
    assert "boom: cannot start node herald-fault-" in str(failed.value)
    assert not node.running()
    node.close()  # safe after a failed start
