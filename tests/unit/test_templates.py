"""Template keys and pointers, disk sizes: the parts of templates and --disk without a VM."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from forkyard.errors import ImageError, InsufficientCapacity
from forkyard.sdk._ops import disk_bytes
from forkyard.store import open_store
from forkyard.vm.shape import VMShape
from forkyard.wire.models import CreateSandboxRequest
from forkyard.wire.worker_models import WorkerCreateRequest
from forkyard.worker._record import DEFAULT_DISK, MAX_DISK, disk_size_for
from forkyard.worker._templates import TemplateIndex, TemplateKey

SHAPE = VMShape(256, 1, "pc-q35-7.2", "tcg", qemu="7.2.22", disk_size=4 << 30)
KEY = TemplateKey("b" * 64, "k" * 64, "i" * 64, "a" * 64, SHAPE)


@pytest.mark.parametrize("change", [
    {"base_digest": "c" * 64}, {"kernel_digest": "x" * 64}, {"initrd_digest": "x" * 64},
    {"agent_digest": "x" * 64}, {"shape": replace(SHAPE, disk_size=2 << 30)},
    {"shape": replace(SHAPE, memory_mb=512)}, {"shape": replace(SHAPE, cpus=2)},
    {"shape": replace(SHAPE, qemu="8.0.0")}, {"shape": replace(SHAPE, devices="forkyard-v9")},
    {"cmdline": "console=ttyS0"},
])
def test_every_input_of_a_template_changes_its_key(change):
    assert replace(KEY, **change).digest != KEY.digest
    assert replace(KEY).digest == KEY.digest


@pytest.mark.parametrize("raw", [b"", b"not-an-id", b"../" + b"a" * 61, b"A" * 64,
                                 b"a" * 63, b"a" * 65, "é".encode() * 32])
def test_a_garbage_store_pointer_is_no_template(tmp_path, raw):
    store = open_store(f"file://{tmp_path}/store")
    store.put_bytes(f"templates/{KEY.digest}", raw, if_absent=False)
    assert TemplateIndex(tmp_path / "t", store).published(KEY) is None


def test_pointers_round_trip_locally_and_through_the_store(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    index = TemplateIndex(tmp_path / "t", store)
    assert index.local(KEY) is None and index.published(KEY) is None
    index.remember(KEY, "d" * 64)
    index.publish(KEY, "e" * 64)
    assert index.local(KEY) == "d" * 64
    assert TemplateIndex(tmp_path / "other", store).published(KEY) == "e" * 64
    index.forget(KEY)
    assert index.local(KEY) is None


def test_disk_sizes():
    base = 110 << 20
    assert disk_size_for(None, base) == DEFAULT_DISK
    assert disk_size_for(None, 8 << 30) == 8 << 30  # an image bigger than the default
    assert disk_size_for((4 << 30) + 1, base) == (4 << 30) + (1 << 20)  # whole MiB
    with pytest.raises(ImageError):
        disk_size_for(base - 1, base)
    with pytest.raises(InsufficientCapacity):
        disk_size_for(MAX_DISK + 1, base)


@pytest.mark.parametrize(("text", "size"), [
    ("4G", 4 << 30), ("4GiB", 4 << 30), ("512m", 512 << 20), ("1T", 1 << 40),
    ("1048576", 1 << 20), (123, 123),
])
def test_disk_size_strings(text, size):
    assert disk_bytes(text) == size


@pytest.mark.parametrize("text", ["", "G", "-4G", "4X", "4.5G", "1e9", "9" * 30 + "G"])
def test_bad_disk_size_strings(text):
    with pytest.raises(ValueError):
        disk_bytes(text)


@pytest.mark.parametrize("model", [CreateSandboxRequest, WorkerCreateRequest])
def test_create_requests_bound_the_disk(model):
    assert model.model_validate({"disk": 4 << 30}).disk == 4 << 30
    for bad in ({"disk": 1}, {"disk": (1 << 40) + 1}, {"cold": "yes"}, {"cold": 1}):
        with pytest.raises(ValidationError):
            model.model_validate(bad)


def test_sdk_create_sends_disk_and_cold_only_when_asked():
    from forkyard.sdk import _ops

    plain = _ops.create("minimal", None, None, None, 10.0)
    assert "disk" not in plain.json and "cold" not in plain.json
    call = _ops.create("minimal", None, None, None, 10.0, disk="4G", cold=True)
    assert call.json["disk"] == 4 << 30 and call.json["cold"] is True
    CreateSandboxRequest.model_validate(call.json)  # what the control plane accepts
