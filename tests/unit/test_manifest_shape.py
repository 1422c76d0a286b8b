"""One VM-shape type in manifests; v1 manifests parse and keep their ids."""

from __future__ import annotations

import json

import pytest

from forkyard.checkpoint import BootRef, Manifest, PartRef, VMInfo
from forkyard.checkpoint.manifest import SHARED_ROLES
from forkyard.errors import IncompatibleCheckpoint, ManifestError
from forkyard.vm.devices import FORKYARD_V1
from forkyard.vm.shape import VMShape

# the id of this manifest as the code before VMShape/VMInfo were unified computed it
V1_ID = "fc5caaf80d727f8c21b81bc81a9c84c62e92c4bb52b22f1cc25fccaa75fb4f95"


def _manifest(**vm: object) -> Manifest:
    shape = VMShape(**{"memory_mb": 256, "cpus": 1, "machine": "pc-q35-7.2", "accel": "tcg",
                       "cpu": "qemu64", "devices": "forkyard-v1", "qemu": "7.2.22",
                       "disk_size": 1 << 30, **vm})  # type: ignore[arg-type]
    return Manifest(
        created="2026-11-28T23:59:00.123Z", base=PartRef("a" * 64, 1 << 30),
        layers=(PartRef("b" * 64, 100),), state=PartRef("c" * 64, 200),
        boot=BootRef(PartRef("d" * 64, 10), PartRef("e" * 64, 20), "console=ttyS0"),
        vm=shape, sandbox="sb-1", parent="f" * 64, name="n", agent="forkyard-agent 1",
        extra={"worker": "w1"},
    )


def test_existing_manifest_ids_do_not_change() -> None:
    m = _manifest()
    assert m.id == V1_ID
    assert json.loads(m.canonical())["vm"] == {
        "qemu": "7.2.22", "machine": "pc-q35-7.2", "accel": "tcg", "cpu": "qemu64",
        "memory_mb": 256, "cpus": 1, "devices": "forkyard-v1", "disk_size": 1 << 30,
    }


def test_parse_gives_the_runtime_shape_with_its_profile() -> None:
    m = _manifest()
    back = Manifest.parse(m.canonical(), expect_id=V1_ID)
    assert back == m
    assert type(back.vm) is VMShape and VMInfo is VMShape
    assert back.vm.profile is FORKYARD_V1


def test_unknown_profile_parses_but_cannot_be_built() -> None:
    # a newer forkyard's checkpoint: a well-formed manifest this one cannot load
    back = Manifest.parse(_manifest(devices="forkyard-v9").canonical())
    with pytest.raises(IncompatibleCheckpoint):
        _ = back.vm.profile


@pytest.mark.parametrize("devices", ["", "../x", "a" * 65, 7, None])
def test_malformed_profile_names_are_refused(devices: object) -> None:
    data = json.loads(_manifest().canonical())
    data["vm"]["devices"] = devices
    with pytest.raises(ManifestError):
        Manifest.parse(json.dumps(data).encode())


def test_own_parts_and_changed_bytes() -> None:
    m = _manifest()
    assert [role for role, _ in m.own_parts()] == ["layer0", "state"]
    assert not {role for role, _ in m.own_parts()} & SHARED_ROLES
    assert m.changed_bytes == 300
