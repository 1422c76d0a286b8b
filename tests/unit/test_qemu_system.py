"""qemu-system probing in one place: machine types, the q35 alias, the cached list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forkyard.errors import SetupError
from forkyard.tools import qemu_system

HELP = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
"""


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_help() -> str:
        calls.append(1)
        return HELP

    monkeypatch.setattr(qemu_system, "_machine_help", fake_help)
    return calls


def test_machine_types_and_alias(probes: list[int]) -> None:
    assert qemu_system.machine_types() == {"microvm", "pc", "pc-i440fx-7.2", "q35",
                                           "pc-q35-7.2", "pc-q35-7.1"}
    assert qemu_system.machine_alias("q35") == "pc-q35-7.2"
    with pytest.raises(SetupError):
        qemu_system.machine_alias("virt")


def test_supported_machines_is_cached_per_qemu_version(tmp_path: Path,
                                                       probes: list[int]) -> None:
    cache = tmp_path / "machines.json"
    first = qemu_system.supported_machines(cache, "7.2.22")
    assert "pc-q35-7.2" in first and len(probes) == 1
    assert qemu_system.supported_machines(cache, "7.2.22") == first and len(probes) == 1
    qemu_system.supported_machines(cache, "8.0.0")  # another QEMU: ask it again
    assert len(probes) == 2
    assert json.loads(cache.read_text())["qemu"] == "8.0.0"


@pytest.mark.parametrize("junk", [b"", b"{", b"[1, 2]", b'{"qemu": "7.2.22", "machines": 5}'])
def test_a_damaged_cache_is_probed_again(tmp_path: Path, probes: list[int], junk: bytes) -> None:
    cache = tmp_path / "machines.json"
    cache.write_bytes(junk)
    assert "pc-q35-7.2" in qemu_system.supported_machines(cache, "7.2.22")
    assert len(probes) == 1
