"""Self-contained export to, and import from, a single qcow2 with a savevm snapshot.

Export writes what other QEMU tooling expects: one qcow2 file with **no
backing file** and an internal snapshot holding RAM + device state, resumable
with ``qemu-system-x86_64 … -loadvm <name>`` (see :func:`plain_qemu_argv`).

Why not ``qemu-img rebase -b ""`` on a thin overlay, as others do?  Internal
snapshots keep their own L1 tables: rebase copies base data only into the
*active* layer, so everything the snapshot took from the base reads back as
zeros after ``loadvm`` (silent corruption; reproduced by
tests/integration/test_export_import.py).  Here the
order is the other way round, so the snapshot's view is complete by
construction: first a complete standalone disk (``qemu-img convert`` of the
whole chain), then a QEMU with exactly the checkpoint's devices loads the
saved state on top of it, paused, and ``savevm`` records the snapshot.

Import takes such a file — ours, or a thin overlay with a savevm snapshot as
other QEMU-based platforms produce — loads the snapshot in a paused QEMU,
saves its state as a migration stream, and keeps only the clusters that
differ from the base as forkyard's layer.  The input is untrusted: its header
is checked before QEMU opens it, and QEMU works on a copy (``loadvm`` rewrites
the disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from forkyard._digest import sha256_file
from forkyard._fs import fsync_dir
from forkyard.checkpoint import qcow2
from forkyard.checkpoint.chunks import split_file
from forkyard.checkpoint.local import Checkpoint, CheckpointFiles, LocalCheckpoints
from forkyard.checkpoint.manifest import BootRef, Manifest, PartRef, utcnow
from forkyard.checkpoint.ram_images import RamImages
from forkyard.config import Home
from forkyard.errors import (
    CheckpointError,
    ImageNotFound,
    IncompatibleCheckpoint,
    UnsafeInput,
    VMError,
)
from forkyard.host.setup import HostInfo
from forkyard.image import ImageCatalog
from forkyard.store import BlobCache
from forkyard.tools import qemu_img
from forkyard.vm.cmdline import standalone_argv
from forkyard.vm.devices import CURRENT_PROFILE, NET_PROFILE
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape

__all__ = ["DEFAULT_SNAPSHOT", "ExportResult", "export_checkpoint", "import_qcow2",
           "plain_qemu_argv"]

DEFAULT_SNAPSHOT = "forkyard"


class WorkerLike(Protocol):
    """What export and import need from a worker (``forkyard.worker.Worker`` is one)."""

    home: Home
    host: HostInfo
    images: ImageCatalog
    blobs: BlobCache
    checkpoints: LocalCheckpoints
    ram_images: RamImages

    def fetch_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint: ...

    def materialize(self, checkpoint: Checkpoint) -> CheckpointFiles: ...


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path
    snapshot: str
    size: int
    argv: list[str]  # a plain QEMU command line that resumes the export


def plain_qemu_argv(vm: VMShape, qcow2_path: Path, *, snapshot: str,
                    agent_socket: Path) -> list[str]:
    """The command line that resumes an export without forkyard.

    It builds the checkpoint's recorded device profile at the same addresses
    (``loadvm`` fails with "Unknown savevm section" otherwise).  No kernel or
    initramfs is needed: the guest's kernel is in the saved RAM.
    """
    return standalone_argv(vm, qcow2_path, snapshot=snapshot, agent_socket=agent_socket)


def _chain_json(base: Path, layers: list[Path]) -> str:
    node: dict[str, object] = {"driver": "raw", "file": {"driver": "file", "filename": str(base)}}
    for layer in layers:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(layer)},
                "backing": node}
    return "json:" + json.dumps(node)


def export_checkpoint(worker: WorkerLike, checkpoint: Checkpoint | str, out: Path, *,
                      snapshot: str = DEFAULT_SNAPSHOT) -> ExportResult:
    cp = worker.fetch_checkpoint(checkpoint)
    m = cp.manifest
    files = worker.materialize(cp)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=worker.home.tmp_dir, prefix="export-") as tmp_s:
        tmp = Path(tmp_s)
        disk = tmp / "export.qcow2"
        # 1. a complete disk: the snapshot taken in step 2 then owns every cluster
        qemu_img.convert(_chain_json(files.base, list(files.layers)), disk, dst_fmt="qcow2")
        # 2. the checkpoint's machine, loaded paused on that disk, saved as a snapshot
        vm = _paused_vm(worker, m, DiskChain(None, (), disk), files.kernel, files.initrd, tmp,
                        "export")
        if m.ram is not None:  # v3: the device state loads over the mapped RAM image
            vm.ram = worker.ram_images.get(m.ram, what=f"checkpoint {cp.short_id}")
        try:
            vm.launch(incoming_state=files.state, run=False)
            _hmp_ok(vm, f"savevm {snapshot}")
            vm.quit()
        finally:
            vm.kill()
        _publish_file(disk, out)
    argv = plain_qemu_argv(m.vm, out, snapshot=snapshot,
                           agent_socket=Path("/tmp/forkyard-export.agent"))
    return ExportResult(out, snapshot, out.stat().st_size, argv)


def import_qcow2(
    worker: WorkerLike,
    path: Path,
    *,
    snapshot: str | None = None,
    base: str | None = None,
    memory_mb: int | None = None,
    cpus: int = 1,
    name: str | None = None,
) -> Checkpoint:
    """Register a qcow2 with a savevm snapshot as a forkyard checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"no file {path} to import")
    header = qcow2.read_header(path)
    _refuse_unsafe(header, path)
    info = qemu_img.info(path)
    snap = _pick_snapshot(info, snapshot, path)
    size = int(info["virtual-size"])
    base_path, base_digest = _import_base(worker, path, header, base, size)
    host = worker.host
    # qcow2 does not record the RAM size; a wrong one fails to load, clearly
    mem = memory_mb or worker.home.settings().memory_mb
    k, i = host.kernel, host.initrd
    boot = BootRef(PartRef(k.digest, k.size), PartRef(i.digest, i.size),
                   BootSpec(k.path, i.path).cmdline)
    with tempfile.TemporaryDirectory(dir=worker.home.tmp_dir, prefix="import-") as tmp_s:
        tmp = Path(tmp_s)
        work = tmp / "work.qcow2"
        state_file = tmp / "state"
        # qcow2 does not record the device set either: a machine without a NIC
        # (what other platforms save), else forkyard's own with one
        failures: list[str] = []
        for profile in (CURRENT_PROFILE, NET_PROFILE):
            shape = VMShape(mem, cpus, host.machine_type, host.accel, qemu=host.qemu_version,
                            disk_size=size, devices=profile.name)
            shutil.copyfile(path, work)  # loadvm reverts the disk: never touch the input
            # whatever path the input names, its clusters sit on base_path (checked above)
            qemu_img.rebase_unsafe(work, str(base_path), "raw")
            chain = DiskChain(base_path, (), work)
            vm = _paused_vm(worker, None, chain, k.path, i.path, tmp, "import", shape=shape)
            try:
                vm.launch(run=False, loadvm=str(snap["name"]))
                vm.save_state(state_file)
                vm.quit()
                break
            except VMError as exc:
                failures.append(f"{profile.name}: {exc}")
            finally:
                vm.kill()
        else:
            raise IncompatibleCheckpoint(
                f"{path.name}: QEMU could not load snapshot {snap['name']!r} with forkyard's "
                f"device profiles and {mem} MiB: {' | '.join(failures)}")
        # only the clusters above the base: the import costs what the sandbox changed
        layer = tmp / "layer.qcow2"
        qemu_img.convert(work, layer, src_fmt="qcow2", dst_fmt="qcow2", backing=base_path,
                         backing_fmt="raw")
        qemu_img.rebase_unsafe(layer, qcow2.parent_marker(base_digest), "raw")
        layer_digest = sha256_file(layer)
        worker.blobs.add_local(layer_digest, layer, verify=False, link=False)
        state_digest, state_size, chunks = split_file(state_file)
        worker.blobs.add_local(state_digest, state_file, verify=False, link=False)
        manifest = Manifest(
            created=utcnow(),
            base=PartRef(base_digest, size),
            layers=(PartRef(layer_digest, layer.stat().st_size),),
            state=PartRef(state_digest, state_size),
            state_chunks=chunks,
            boot=boot,
            vm=shape,
            sandbox="imported",
            name=name or f"import:{path.name}"[:120],
            extra={"imported_from": path.name[:200], "snapshot": str(snap["name"])[:200]},
        )
    return worker.checkpoints.add(manifest)


# --- helpers -----------------------------------------------------------------
def _paused_vm(worker: WorkerLike, m: Manifest | None, disk: DiskChain, kernel: Path, initrd: Path,
               workdir: Path, tag: str, *, shape: VMShape | None = None) -> QemuVM:
    if shape is None:
        if m is None:
            raise CheckpointError("a VM shape is needed")
        shape = m.vm
    cmdline = m.boot.cmdline if m is not None else BootSpec(kernel, initrd).cmdline
    return QemuVM(
        name=f"{tag}-{os.getpid()}",
        workdir=workdir / "vm",
        agent_socket=worker.home.run_dir / f"{tag}-{os.getpid()}-{id(disk)}.agent",
        shape=shape,
        boot=BootSpec(kernel, initrd, cmdline),
        disk=disk,
    )


def _publish_file(src: Path, out: Path) -> None:
    """Put QEMU's finished file at ``out``: old or complete there, never half.

    ``atomic_write`` would copy gigabytes through Python; the file is already
    written, so it only needs the same fsync'd rename.
    """
    tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.move(src, tmp_out)
        fd = os.open(tmp_out, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp_out.replace(out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_out.unlink()
        raise
    fsync_dir(out.parent)


def _hmp_ok(vm: QemuVM, command: str) -> None:
    out = vm.hmp(command).strip()
    if out:  # HMP reports failure only as text
        raise VMError(f"`{command}` failed: {out}", log_tail=vm.log_tail())


def _refuse_unsafe(h: qcow2.Qcow2Header, path: Path) -> None:
    if h.crypt_method != 0:
        raise UnsafeInput("encrypted qcow2 images are not supported", entry=path.name)
    if h.data_file_extension or h.incompatible & 0b100:
        raise UnsafeInput("qcow2 with an external data file refused", entry=path.name)
    if h.incompatible & 0b10:
        raise UnsafeInput("qcow2 is marked corrupt", entry=path.name)


def _pick_snapshot(info: dict[str, object], wanted: str | None, path: Path) -> dict[str, object]:
    snaps = info.get("snapshots") or []
    if not isinstance(snaps, list) or not snaps:
        raise CheckpointError(f"{path.name} has no internal snapshot to import")
    if wanted is None:
        if len(snaps) > 1:
            names = ", ".join(str(s.get("name")) for s in snaps)
            raise CheckpointError(f"{path.name} has several snapshots ({names}); pick one")
        snap = snaps[0]
    else:
        matches = [s for s in snaps if s.get("name") == wanted or str(s.get("id")) == wanted]
        if not matches:
            raise CheckpointError(f"{path.name} has no snapshot {wanted!r}")
        snap = matches[0]
    if not int(snap.get("vm-state-size", 0)):
        raise CheckpointError(
            f"snapshot {snap.get('name')!r} of {path.name} has no VM state (disk-only)"
        )
    return dict(snap)


def _import_base(worker: WorkerLike, path: Path, h: qcow2.Qcow2Header, base: str | None,
                 size: int) -> tuple[Path, str]:
    """The raw base the input's clusters are relative to, registered by digest."""
    if base is not None:
        try:
            info = worker.images.get(base)
        except ImageNotFound:
            candidate = Path(base)
            if not candidate.is_file():
                raise
            info = worker.images.import_blob(sha256_file(candidate), candidate)
        if info.size != size:
            raise IncompatibleCheckpoint(
                f"base {base} is {info.size} bytes, the image's disk is {size}"
            )
        return info.path, info.digest
    if h.backing_name:
        backing = Path(h.backing_name)
        if not backing.is_absolute():
            backing = path.parent / backing
        if not backing.is_file():
            raise CheckpointError(
                f"{path.name} is an overlay on {h.backing_name!r}, which is not here; "
                "pass the base with --base"
            )
        info = worker.images.import_blob(sha256_file(backing), backing)
        if info.size != size:
            raise IncompatibleCheckpoint(
                f"backing file {backing} is {info.size} bytes, the overlay's disk is {size}"
            )
        return info.path, info.digest
    # Standalone: every cluster is in the file; the base is an empty disk.
    zero = worker.home.tmp_dir / f"zero-{size}.raw"
    if not zero.exists():
        with open(zero, "wb") as f:
            f.truncate(size)
    digest = sha256_file(zero)
    info = worker.images.import_blob(digest, zero)
    with contextlib.suppress(OSError):
        zero.unlink()
    return info.path, digest
