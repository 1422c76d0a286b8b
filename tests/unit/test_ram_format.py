"""Format v3 pieces without a VM: the RAM chunk list's validation and the stream splitter."""

from __future__ import annotations

import io
import json
import mmap
import struct
from dataclasses import replace

import pytest

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef, ram_chunk_size
from forkyard.checkpoint.manifest import FORMAT_V3, BootRef, Manifest, PartRef
from forkyard.errors import ManifestError
from forkyard.vm.migstream import StreamFormatError, saved_ignore_shared, split_stream
from forkyard.vm.shape import VMShape

D = "ab" * 32
MIB = 1024 * 1024
CS = 256 * 1024


def _manifest(ram: RamImageRef) -> Manifest:
    return Manifest(
        created="2026-12-02T00:00:00.000Z", base=PartRef(D, 1 << 30), layers=(),
        state=PartRef(D, 10), state_chunks=(ChunkRef(0, 10, D),),
        boot=BootRef(PartRef(D, 1), PartRef(D, 1), "console=ttyS0"),
        vm=VMShape(256, 1, "pc-q35-7.2", "tcg", qemu="7.2.22", disk_size=1 << 30),
        sandbox="sb-1", ram=ram)


def test_v3_round_trips_and_names_its_chunks() -> None:
    ram = RamImageRef(256 * MIB, CS, (ChunkRef(0, CS, D), ChunkRef(5 * CS, CS, D)))
    m = _manifest(ram)
    raw = m.canonical()
    assert json.loads(raw)["format"] == FORMAT_V3
    back = Manifest.parse(raw, expect_id=m.id)
    assert back == m and back.ram == ram
    assert [r for r, _ in back.parts() if r.startswith("ram.")] == ["ram.0", "ram.1"]
    assert ram.id != replace(ram, chunks=ram.chunks[:1]).id


@pytest.mark.parametrize("chunks, size, cs", [
    ((ChunkRef(1, CS, D),), 256 * MIB, CS),  # not on a chunk boundary
    ((ChunkRef(CS, CS, D), ChunkRef(0, CS, D)), 256 * MIB, CS),  # out of order
    ((ChunkRef(0, CS, D), ChunkRef(0, CS, D)), 256 * MIB, CS),  # twice
    ((ChunkRef(0, 100, D),), 256 * MIB, CS),  # short chunk inside the image
    ((ChunkRef(256 * MIB, CS, D),), 256 * MIB, CS),  # outside the image
    ((), 128 * MIB, CS),  # not the VM's RAM size
    ((), 256 * MIB, 3 * 65536),  # chunk size not a power of two
    ((), 256 * MIB, 4096),  # chunk size too small
])
def test_bad_ram_chunk_lists_are_refused(chunks: tuple[ChunkRef, ...], size: int,
                                         cs: int) -> None:
    raw = _manifest(RamImageRef(256 * MIB, CS, ())).to_json()
    raw["ram"] = RamImageRef(size, cs, chunks).to_json()
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def test_chunk_size_keeps_images_within_4096_chunks() -> None:
    assert ram_chunk_size(256 * MIB) == 64 * 1024
    assert ram_chunk_size(2048 * MIB) == 512 * 1024
    assert ram_chunk_size(3000 * MIB) == 1 * MIB


# --- the stream splitter ------------------------------------------------------
def _name(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _stream(records: list[bytes], *, image_size: int = 4 * 4096, ignore_shared: bool = True,
            more: tuple[list[bytes], ...] = (), end: bool = True) -> tuple[bytes, bytes]:
    """(a QEMU-shaped stream, what it must become without pc.ram pages).

    ``ignore_shared=False``: as a live save writes it (no capability, no block
    addresses); ``more``: further RAM parts; ``end=False``: no RAM END section,
    the device state right after the last part (a background snapshot).
    """
    head = struct.pack(">II", 0x5145564D, 3)
    config = b"\x07" + struct.pack(">I", 10) + b"pc-q35-7.2"
    if ignore_shared:
        config += (b"\x05" + _name(b"configuration/capabilities") + struct.pack(">I", 1)
                   + struct.pack(">I", 1) + _name(b"x-ignore-shared"))
    addr = (lambda a: struct.pack(">Q", a)) if ignore_shared else (lambda a: b"")
    blocks = (_name(b"pc.ram") + struct.pack(">Q", image_size) + addr(0)
              + _name(b"pc.bios") + struct.pack(">Q", 4096) + addr(0xFFFC0000))
    start = (b"\x01" + struct.pack(">I", 2) + _name(b"ram") + struct.pack(">II", 0, 4)
             + struct.pack(">Q", (image_size + 4096) | 0x04) + blocks
             + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2))
    eos = struct.pack(">Q", 0x10)
    footer = b"\x7e" + struct.pack(">I", 2)
    part_in = part_out = b""
    for part in (records, *more):
        kept = [r for r in part if b"pc.bios" in r]
        part_in += b"\x02" + struct.pack(">I", 2) + b"".join(part) + eos + footer
        part_out += b"\x02" + struct.pack(">I", 2) + b"".join(kept) + eos + footer
    ram_end = b"\x03" + struct.pack(">I", 2) + eos + footer if end else b""
    devices = b"\x04" + b"opaque device sections" + b"\x00"
    return (head + config + start + part_in + ram_end + devices,
            head + config + start + part_out + ram_end + devices)


def _page(addr: int, block: bytes, fill: bytes, *, cont: bool = False) -> bytes:
    flags = 0x08 | (0x20 if cont else 0)
    return struct.pack(">Q", addr | flags) + (b"" if cont else _name(block)) + fill * 4096


def _zero(addr: int, block: bytes) -> bytes:
    return struct.pack(">Q", addr | 0x02) + _name(block) + b"\x00"


def _split(stream: bytes, size: int = 4 * 4096) -> tuple[bytes, bytes]:
    out = io.BytesIO()
    with mmap.mmap(-1, size) as image:
        split_stream(io.BufferedReader(io.BytesIO(stream)), out, image)  # type: ignore[arg-type]
        return out.getvalue(), bytes(image)


def test_pages_of_pc_ram_go_to_the_image_and_everything_else_through() -> None:
    records = [_page(0, b"pc.ram", b"a"), _page(4096, b"pc.ram", b"b", cont=True),
               _page(0, b"pc.bios", b"c"), _zero(2 * 4096, b"pc.ram"),
               _page(3 * 4096, b"pc.ram", b"d")]
    stream, expected = _stream(records)
    out, image = _split(stream)
    assert out == expected
    assert image == b"a" * 4096 + b"b" * 4096 + bytes(4096) + b"d" * 4096


@pytest.mark.parametrize("record", [
    _page(4 * 4096, b"pc.ram", b"x"),  # outside the image
    struct.pack(">Q", 0x40) + _name(b"pc.ram") + b"x",  # XBZRLE: never enabled
    _page(0, b"pc.ram", b"x", cont=True),  # CONTINUE before any block
    struct.pack(">Q", 0x02) + _name(b"pc.ram") + b"\x07",  # a ZERO page that is not
])
def test_what_the_splitter_does_not_understand_is_an_error(record: bytes) -> None:
    stream, _ = _stream([record])
    with pytest.raises(StreamFormatError):
        _split(stream)


def test_a_truncated_stream_is_an_error() -> None:
    stream, _ = _stream([_page(0, b"pc.ram", b"a")])
    with pytest.raises(StreamFormatError):
        _split(stream[: len(stream) // 2])


def test_a_live_stream_splits_to_its_last_pages_and_says_it_was_live(tmp_path) -> None:
    """A precopy save sends pages again as the guest dirties them: the last wins,
    a page turned zero is cleared, and the stream records no x-ignore-shared."""
    first = [_page(0, b"pc.ram", b"a"), _page(4096, b"pc.ram", b"b"), _page(0, b"pc.bios", b"c")]
    again = [_page(0, b"pc.ram", b"A"), _zero(4096, b"pc.ram"), _page(3 * 4096, b"pc.ram", b"d")]
    stream, expected = _stream(first, ignore_shared=False, more=(again,))
    out, image = _split(stream)
    assert out == expected
    assert image == b"A" * 4096 + bytes(4096) + bytes(4096) + b"d" * 4096
    live, paused = tmp_path / "live", tmp_path / "paused"
    live.write_bytes(out)
    paused.write_bytes(_stream(first)[1])
    assert not saved_ignore_shared(live) and saved_ignore_shared(paused)
    (tmp_path / "junk").write_bytes(b"not a stream at all")
    with pytest.raises(StreamFormatError):
        saved_ignore_shared(tmp_path / "junk")


def test_a_background_snapshot_stream_ends_its_ram_with_a_part() -> None:
    """QEMU's background snapshot writes no RAM END: the device state (saved at the
    snapshot's instant, before the RAM) follows the last part, and passes through."""
    first = [_page(0, b"pc.ram", b"a"), _page(0, b"pc.bios", b"c")]
    faulted = [_page(3 * 4096, b"pc.ram", b"d"), _zero(4096, b"pc.ram")]
    stream, expected = _stream(first, ignore_shared=False, more=(faulted,), end=False)
    out, image = _split(stream)
    assert out == expected and out.endswith(b"opaque device sections\x00")
    assert image == b"a" * 4096 + bytes(3 * 4096 - 4096) + b"d" * 4096


def test_device_state_before_any_ram_is_an_error() -> None:
    stream, _ = _stream([_page(0, b"pc.ram", b"a")])
    head_and_config = stream[:stream.index(b"\x01" + struct.pack(">I", 2))]
    with pytest.raises(StreamFormatError):
        _split(head_and_config + b"\x04" + b"opaque device sections" + b"\x00")
