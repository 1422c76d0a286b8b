"""The worker library: sandboxes, checkpoints and forks on one machine.

A :class:`Worker` owns one forkyard home.  Everything the control plane and
the CLI do to VMs goes through it.  QEMU processes die with the process that
owns the worker (see ``forkyard.vm._spawn``), and :meth:`Worker.close` stops
them earlier.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard._digest import sha256_file
from forkyard.checkpoint import (
    BootRef,
    Checkpoint,
    LocalCheckpoints,
    Manifest,
    PartRef,
    VMInfo,
    archive,
    qcow2,
)
from forkyard.config import Home
from forkyard.errors import (
    CheckpointError,
    CheckpointNotFound,
    ForkyardError,
    ImageNotFound,
    IncompatibleCheckpoint,
    SandboxNotFound,
    SandboxStateError,
    SetupError,
)
from forkyard.host.setup import HostInfo, ensure_host
from forkyard.image import ImageCatalog, ImageInfo, MinimalSource, build_image
from forkyard.store import BlobCache, BlobStore, ObjectStore, open_store
from forkyard.vm.machine import DEVICE_PROFILE, BootSpec, DiskChain, QemuVM, VMShape
from forkyard.wire.ids import new_sandbox_id
from forkyard.worker._sandbox import Sandbox, SandboxState, utcnow
from forkyard.worker._stream import StateStream

__all__ = ["Worker"]


@dataclass
class _Parts:
    """A checkpoint's parts as they arrive (see Worker._gather)."""

    kernel: Future[Path]
    initrd: Future[Path]
    disks: Future[tuple[Path, builtins.list[Path]]]  # base, layers: verified
    state: Path | StateStream
    pool: ThreadPoolExecutor

    def close(self) -> None:
        if isinstance(self.state, StateStream):
            self.state.close()
        self.pool.shutdown(wait=False)


BUILTIN_IMAGES = {"minimal": MinimalSource}
_BOOT_TIMEOUT = 180.0  # a TCG boot is ~3 s, but CI machines are shared and slow
_KEEP_FAILED = 20  # logs of sandboxes that failed to start, kept in <home>/failed/


def _lock_home(home: Home) -> int:
    """One Worker per home: a second one would treat the first's sandboxes as stale."""
    fd = os.open(home.root / "worker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SetupError(
            f"{home.root} is in use by another forkyard worker (pid {owner}); "
            "give this one its own home"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class Worker:
    def __init__(
        self,
        home: Home | str | Path | None = None,
        *,
        name: str | None = None,
        store: str | ObjectStore | None = None,
        install: bool = True,
        log: Callable[[str], None] | None = None,
        confine: bool = True,
    ) -> None:
        # confine: False only to measure what the jail costs (benchmarks/bench_confine.py)
        self.confine = confine
        self.home = home if isinstance(home, Home) else Home.at(home)
        self.home.ensure()
        self._home_lock = _lock_home(self.home)
        try:
            self._open(name, store, install, log)
        except BaseException:
            os.close(self._home_lock)
            raise

    def _open(self, name: str | None, store: str | ObjectStore | None, install: bool,
              log: Callable[[str], None] | None) -> None:
        self.name = name or self.home.root.name
        settings = self.home.settings()
        if store is None or isinstance(store, str):
            store = open_store(store or self.home.default_store_url(), settings)
        self.store: ObjectStore = store
        self.blobstore = BlobStore(store)
        self.host: HostInfo = ensure_host(self.home, install=install, log=log)
        self.images = ImageCatalog(self.home)
        self.checkpoints = LocalCheckpoints(self.home.checkpoints_dir)
        self.blobs = BlobCache(self.home.cache_dir / "blobs")
        self._sandboxes: dict[str, Sandbox] = {}
        self._lock = threading.Lock()
        self._state_downloads: dict[str, StateStream] = {}  # by digest, while in flight
        self._image_lock = threading.Lock()
        self._closed = False
        self._reap_stale()
        for f in (self.host.kernel, self.host.initrd):
            self.blobs.add_local(f.digest, f.path, verify=False, link=True)

    # ------------------------------------------------------------------
    # images
    def image(self, ref: str = "minimal") -> ImageInfo:
        """Find an image; the built-in ``minimal`` is built on first use."""
        try:
            return self.images.get(ref)
        except ImageNotFound:
            if ref not in BUILTIN_IMAGES:
                raise
        with self._image_lock:
            try:
                return self.images.get(ref)
            except ImageNotFound:
                return build_image(self.home, BUILTIN_IMAGES[ref](), name=ref)

    # ------------------------------------------------------------------
    # sandboxes
    def create(
        self,
        image: str = "minimal",
        *,
        memory_mb: int | None = None,
        cpus: int | None = None,
        sandbox_id: str | None = None,
        timeout: float = _BOOT_TIMEOUT,
    ) -> Sandbox:
        """Boot a new sandbox from a base image and wait until its agent answers."""
        self._check_open()
        info = self.image(image)
        settings = self.home.settings()
        sb = self._register(
            sandbox_id,
            base_digest=info.digest,
            disk_size=info.size,
            memory_mb=memory_mb or settings.memory_mb,
            cpus=cpus or settings.cpus,
            parent=None,
        )
        try:
            sb._layer_refs = ()
            sb._boot_ref = self._host_boot()
            active = sb._new_active(info.digest)
            shape = self._local_shape(sb.memory_mb, sb.cpus)
            boot = BootSpec(self.host.kernel.path, self.host.initrd.path)
            vm = self._vm(sb, shape, boot, DiskChain(info.path, (), active))
            sb._start(vm, incoming=None, timeout=timeout)
        except BaseException:
            self._discard(sb)
            raise
        return sb

    def fork(
        self,
        checkpoint: Checkpoint | str,
        *,
        sandbox_id: str | None = None,
        timeout: float = _BOOT_TIMEOUT,
    ) -> Sandbox:
        """A new sandbox that continues exactly from ``checkpoint``."""
        self._check_open()
        cp = self.resolve_checkpoint(checkpoint)
        m = cp.manifest
        sb = self._register(
            sandbox_id, base_digest=m.base.digest, disk_size=m.vm.disk_size,
            memory_mb=m.vm.memory_mb, cpus=m.vm.cpus, parent=cp.id,
        )
        try:
            self._launch_from(sb, cp, timeout=timeout)
        except BaseException:
            self._discard(sb)
            raise
        return sb

    def fork_many(self, checkpoint: Checkpoint | str, count: int) -> list[Sandbox]:
        """``count`` forks started concurrently; all or nothing."""
        cp = self.resolve_checkpoint(checkpoint)
        with ThreadPoolExecutor(max_workers=min(count, 8)) as pool:
            futures = [pool.submit(self.fork, cp) for _ in range(count)]
        out: list[Sandbox] = []
        error: BaseException | None = None
        for f in futures:
            try:
                out.append(f.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            for sb in out:
                sb.destroy()
            raise error
        return out

    def restore(self, sandbox: Sandbox, checkpoint: Checkpoint | str,
                *, timeout: float = _BOOT_TIMEOUT) -> None:
        """Revert ``sandbox`` in place: same id, the machine of ``checkpoint``."""
        cp = self.resolve_checkpoint(checkpoint)
        with sandbox._lock:
            if sandbox.state is SandboxState.DESTROYED:
                raise SandboxStateError(sandbox.id, sandbox.state.value, "restore")
            sandbox._shutdown()
            sandbox._discard_disks()
            sandbox.base_digest = cp.manifest.base.digest
            sandbox.disk_size = cp.manifest.vm.disk_size
            sandbox.memory_mb = cp.manifest.vm.memory_mb
            sandbox.cpus = cp.manifest.vm.cpus
            sandbox.parent_checkpoint = cp.id
            self._launch_from(sandbox, cp, timeout=timeout)

    def wake(self, sandbox_id: str, *, checkpoint: Checkpoint | str | None = None,
             timeout: float = _BOOT_TIMEOUT) -> Sandbox:
        """Resume a hibernated sandbox (same id) from its last checkpoint.

        With ``checkpoint``, a sandbox hibernated on *another* worker is adopted
        here: a fork of that (published) checkpoint that keeps the sandbox id.
        """
        with self._lock:
            local = self._sandboxes.get(sandbox_id)
        if checkpoint is not None:
            cp = self.resolve_checkpoint(checkpoint)
            if local is not None and local.last_checkpoint != cp.id:
                # a stale copy from an earlier stay on this worker: the sandbox
                # has moved on elsewhere since, and `checkpoint` is where it is now
                local.destroy()
                local = None
            if local is None:
                return self.fork(cp, sandbox_id=sandbox_id, timeout=timeout)
        sb = self.get(sandbox_id)
        if sb.state is not SandboxState.HIBERNATED or sb.last_checkpoint is None:
            raise SandboxStateError(sb.id, sb.state.value, "wake")
        self.restore(sb, sb.last_checkpoint, timeout=timeout)
        return sb

    def get(self, sandbox_id: str) -> Sandbox:
        with self._lock:
            sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        return sb

    def list(self) -> list[Sandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    def close(self) -> None:
        """Stop every sandbox of this worker (hibernated ones stay wakeable)."""
        if self._closed:
            return
        self._closed = True
        for sb in self.list():
            with contextlib.suppress(Exception):
                if sb.state is SandboxState.HIBERNATED:
                    continue
                sb.destroy()
        os.close(self._home_lock)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------
    # checkpoints
    def resolve_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """A local checkpoint, or a published one whose manifest is fetched (verified)."""
        if isinstance(checkpoint, Checkpoint):
            return checkpoint
        try:
            return self.checkpoints.get(checkpoint)
        except CheckpointNotFound:
            pass
        manifest = archive.fetch_manifest(self.store, checkpoint)
        return Checkpoint.of(manifest)

    def publish(
        self,
        checkpoint: Checkpoint | str,
        *,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> archive.PublishReport:
        """Make ``checkpoint`` forkable on any worker sharing this worker's store."""
        cp = self.checkpoints.get(checkpoint.id if isinstance(checkpoint, Checkpoint)
                                  else checkpoint)
        report = archive.publish(cp.manifest, self.blobstore, self._local_part,
                                 progress=progress)
        self.checkpoints.mark(cp.id, "published", self.store.url)
        return report

    def is_published(self, checkpoint_id: str) -> bool:
        return archive.is_published(self.store, checkpoint_id)

    def fetch_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """Bring a published checkpoint and all its parts here, without starting it."""
        cp = self.resolve_checkpoint(checkpoint)
        self._check_compatible(cp)
        self._materialize(cp)
        return self.checkpoints.add(cp.manifest)

    def cached_bases(self) -> builtins.list[str]:
        digests = {info.digest for info in self.images.list()}
        for cp in self.checkpoints.list():
            if self.blobs.path_if_present(cp.manifest.base.digest) is not None:
                digests.add(cp.manifest.base.digest)
        return sorted(digests)

    def local_checkpoint_ids(self) -> builtins.list[str]:
        return [cp.id for cp in self.checkpoints.list()]

    def _local_part(self, role: str, ref: PartRef) -> Path:
        if role == "base":
            path = self._find_base(ref.digest)
        else:
            path = self.blobs.path_if_present(ref.digest)
        if path is None:
            raise CheckpointError(
                f"{role} sha256:{ref.digest} is not on worker {self.name}; cannot publish"
            )
        return path

    def _record_checkpoint(self, sb: Sandbox, vm: QemuVM, frozen: Path, state_tmp: Path,
                           *, name: str | None, pause_seconds: float) -> Checkpoint:
        """Catalogue a capture: hash the parts, file them by digest, write the manifest."""
        state_digest = sha256_file(state_tmp)
        state_path = self.blobs.add_local(state_digest, state_tmp, verify=False, link=True)
        state_tmp.unlink()
        layers = self._file_frozen_layer(sb, vm, frozen)
        if sb._boot_ref is None:
            raise CheckpointError(f"sandbox {sb.id} has no boot record")
        s = vm.shape
        manifest = Manifest(
            created=utcnow(),
            base=PartRef(sb.base_digest, sb.disk_size),
            layers=layers,
            state=PartRef(state_digest, state_path.stat().st_size),
            boot=sb._boot_ref,
            vm=VMInfo(
                qemu=self.host.qemu_version, machine=s.machine_type, accel=s.accel,
                cpu=s.cpu_model, memory_mb=s.memory_mb, cpus=s.cpus, devices=s.devices,
                disk_size=sb.disk_size,
            ),
            sandbox=sb.id,
            parent=sb.parent_checkpoint,
            name=name,
            agent=self._agent_version(sb),
            extra={"worker": self.name, "pause_ms": str(round(pause_seconds * 1000, 1))},
        )
        return self.checkpoints.add(manifest)

    def _file_frozen_layer(self, sb: Sandbox, vm: QemuVM, frozen: Path
                           ) -> tuple[PartRef, ...]:
        """A layer the VM no longer writes: file it by digest, and name it in the next
        layer's header, so every later layer records exactly what lies below it."""
        digest = sha256_file(frozen)
        self.blobs.add_local(digest, frozen, verify=False, link=True)
        vm.set_parent_marker(qcow2.parent_marker(digest))
        sb._layer_refs = (*sb._layer_refs, PartRef(digest, frozen.stat().st_size))
        return sb._layer_refs

    def _host_boot(self) -> BootRef:
        k, i = self.host.kernel, self.host.initrd
        return BootRef(PartRef(k.digest, k.size), PartRef(i.digest, i.size),
                       BootSpec(k.path, i.path).cmdline)

    def _agent_version(self, sb: Sandbox) -> str:
        agent = sb._agent
        return agent.version if agent is not None else ""

    def _launch_from(self, sb: Sandbox, cp: Checkpoint, *, timeout: float) -> None:
        """Start ``sb`` as a copy of ``cp``, overlapping any downloads with QEMU's start.

        With every part local, the whole disk chain goes on QEMU's command
        line.  Otherwise QEMU starts at once with an empty top layer and
        nothing under it, loads the VM state (streamed, if it is downloading)
        and stays paused; the base and layers are fetched and verified
        meanwhile, attached under the top layer, and only then does the VM run.
        """
        m = cp.manifest
        self._check_compatible(cp)
        parts = self._gather(cp, stream_state=True)
        try:
            sb.dir.mkdir(parents=True, exist_ok=True)
            sb._layer_refs = m.layers
            sb._boot_ref = m.boot
            active = sb._new_active(sb._chain_top_digest())
            shape = VMShape(m.vm.memory_mb, m.vm.cpus, m.vm.machine, m.vm.accel, m.vm.cpu,
                            m.vm.devices)
            kernel, initrd = parts.kernel.result(), parts.initrd.result()
            boot = BootSpec(kernel, initrd, m.boot.cmdline)
            state = parts.state
            if isinstance(state, Path) and parts.disks.done():
                base, layers = parts.disks.result()
                vm = self._vm(sb, shape, boot, DiskChain(base, tuple(layers), active))
                sb._start(vm, incoming=state, timeout=timeout)
            else:
                vm = self._vm(sb, shape, boot, DiskChain(None, (), active))

                def verdict() -> None:
                    if isinstance(state, StateStream):
                        state.finish(timeout)
                    parts.disks.result(timeout)

                def attach(vm: QemuVM) -> None:
                    base, layers = parts.disks.result()
                    vm.attach_backing(base, tuple(layers))

                incoming = state if isinstance(state, Path) else state.take_fd()
                sb._start(vm, incoming=incoming, timeout=timeout, verdict=verdict,
                          attach=attach)
        finally:
            parts.close()
        # every part is here now: later forks of it on this worker stay local
        self.checkpoints.add(m)

    def _check_compatible(self, cp: Checkpoint) -> None:
        vm = cp.manifest.vm
        if vm.devices != DEVICE_PROFILE:
            raise IncompatibleCheckpoint(
                f"checkpoint {cp.short_id} uses device profile {vm.devices!r}; "
                f"this forkyard builds {DEVICE_PROFILE!r}"
            )
        if vm.accel != self.host.accel:
            raise IncompatibleCheckpoint(
                f"checkpoint {cp.short_id} was saved under {vm.accel}, this host runs "
                f"{self.host.accel}: QEMU cannot move a running state between them"
            )
        if vm.machine not in self.supported_machines():
            raise IncompatibleCheckpoint(
                f"checkpoint {cp.short_id} needs machine type {vm.machine!r}, which this "
                f"QEMU {self.host.qemu_version} does not have"
            )

    def supported_machines(self) -> set[str]:
        cache = self.home.host_dir / "machines.json"
        if cache.exists():
            data = json.loads(cache.read_text())
            if data.get("qemu") == self.host.qemu_version:
                return set(data["machines"])
        from forkyard._proc import run

        out = run(["qemu-system-x86_64", "-machine", "help"], timeout=30).text
        names = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
        cache.write_text(json.dumps({"qemu": self.host.qemu_version, "machines": sorted(names)}))
        return names

    def _materialize(self, cp: Checkpoint) -> tuple[Path, builtins.list[Path], Path, Path, Path]:
        """Local, verified paths of every part of ``cp`` (fetching what is missing)."""
        parts = self._gather(cp, stream_state=False)
        try:
            base, layers = parts.disks.result()
            state = parts.state
            assert isinstance(state, Path)
            return base, layers, state, parts.kernel.result(), parts.initrd.result()
        finally:
            parts.close()

    def _gather(self, cp: Checkpoint, *, stream_state: bool) -> _Parts:
        """Start fetching every missing part of ``cp``, in parallel.

        Disk parts are verified before anything can run on them: a missing or
        corrupt part is an error, never a broken VM.  With ``stream_state`` a
        missing VM state comes back as a stream that a paused QEMU loads while
        it downloads (see worker._stream).
        """
        m = cp.manifest
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        state: Path | StateStream | None = self.blobs.path_if_present(m.state.digest)
        ahead: StateStream | None = None  # another fork's download of this state
        if state is None and stream_state:
            state, ahead = self._stream_state(m.state)
        try:
            f_base = pool.submit(
                lambda: self._find_base(m.base.digest) or self._fetch(m.base, "base image", cp))
            f_layers = [pool.submit(self._blob, ref, f"disk layer {i}", cp)
                        for i, ref in enumerate(m.layers)]

            def disks() -> tuple[Path, builtins.list[Path]]:
                layers = [f.result() for f in f_layers]
                parent = m.base.digest
                for i, (ref, path) in enumerate(zip(m.layers, layers, strict=True)):
                    what = f"disk layer {i} of checkpoint {cp.short_id}"
                    qcow2.check_layer(path, parent=parent, disk_size=m.vm.disk_size, what=what)
                    parent = ref.digest
                return f_base.result(), layers

            parts = _Parts(
                kernel=pool.submit(self._blob, m.boot.kernel, "kernel", cp),
                initrd=pool.submit(self._blob, m.boot.initrd, "initramfs", cp),
                disks=pool.submit(disks),
                state=state if state is not None else self._state_file(m.state, cp, ahead),
                pool=pool,
            )
        except BaseException:
            if isinstance(state, StateStream):
                state.close()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return parts

    def _stream_state(self, ref: PartRef) -> tuple[StateStream | None, StateStream | None]:
        """A new stream of this VM state, or ``(None, ahead)`` if one is in flight.

        Concurrent forks of a checkpoint whose state is not here download it
        once: the first streams it, the others wait for it to be cached.
        """
        with self._lock:
            ahead = self._state_downloads.get(ref.digest)
            if ahead is not None:
                return None, ahead

            def landed() -> None:
                with self._lock:
                    self._state_downloads.pop(ref.digest, None)

            stream = StateStream(self.blobs, self.blobstore, ref, on_done=landed)
            stream.start()
            self._state_downloads[ref.digest] = stream
        return stream, None

    def _state_file(self, ref: PartRef, cp: Checkpoint, ahead: StateStream | None) -> Path:
        if ahead is not None:
            # Whatever became of that download, the cache now has the state or
            # a fetch of our own reports exactly what is wrong with it.
            ahead.wait_done(_BOOT_TIMEOUT)
        return self._blob(ref, "VM state", cp)

    def _find_base(self, digest: str) -> Path | None:
        """A local file with exactly these bytes: a catalogued image or a fetched base."""
        if self.images.has(digest):
            return self.images.path(digest)
        return self.blobs.path_if_present(digest)

    def _blob(self, ref: PartRef, what: str, cp: Checkpoint) -> Path:
        return self.blobs.path_if_present(ref.digest) or self._fetch(ref, what, cp)

    def _fetch(self, ref: PartRef, what: str, cp: Checkpoint) -> Path:
        try:
            return self.blobs.fetch(ref.digest, self.blobstore, size=ref.size)
        except ForkyardError as exc:
            exc.add_note(f"while fetching the {what} (sha256:{ref.digest}) of checkpoint "
                         f"{cp.id} from {self.store.url}")
            raise

    # ------------------------------------------------------------------
    # internals
    def _local_shape(self, memory_mb: int, cpus: int) -> VMShape:
        return VMShape(memory_mb, cpus, self.host.machine_type, self.host.accel)

    def _vm(self, sb: Sandbox, shape: VMShape, boot: BootSpec, disk: DiskChain) -> QemuVM:
        return QemuVM(
            name=sb.id,
            workdir=sb.dir,
            agent_socket=self.home.run_dir / f"{sb.id}.agent",
            shape=shape,
            boot=boot,
            disk=disk,
            confine=self.confine,
        )

    def _register(self, sandbox_id: str | None, **kw: Any) -> Sandbox:
        sid = sandbox_id or new_sandbox_id()
        with self._lock:
            if sid in self._sandboxes:
                raise SandboxStateError(sid, self._sandboxes[sid].state.value, "create")
            sb = Sandbox(self, sid, **kw)
            self._sandboxes[sid] = sb
        sb.dir.mkdir(parents=True, exist_ok=False)
        return sb

    def _discard(self, sb: Sandbox) -> None:
        """Drop a sandbox that failed to start, keeping its logs for a post-mortem."""
        sb._shutdown()
        sb._mark_failed()
        self._keep_logs(sb)
        self._forget(sb)

    def _keep_logs(self, sb: Sandbox) -> None:
        failed = self.home.root / "failed"
        with contextlib.suppress(OSError):
            dest = failed / sb.id
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("qemu.log", "console.log", "qemu.argv.json", "sandbox.json"):
                if (sb.dir / name).exists():
                    shutil.copyfile(sb.dir / name, dest / name)
            # bounded: the newest few post-mortems are what anyone reads
            for old in sorted(failed.iterdir(), key=lambda p: p.stat().st_mtime)[:-_KEEP_FAILED]:
                shutil.rmtree(old, ignore_errors=True)

    def _forget(self, sb: Sandbox) -> None:
        with self._lock:
            self._sandboxes.pop(sb.id, None)
        shutil.rmtree(sb.dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxStateError("-", "closed", f"use worker {self.name}")

    def _reap_stale(self) -> None:
        """Sandboxes left by an earlier process: hibernated ones come back, others are gone.

        Their QEMUs died with that process (pdeathsig), so only files remain.
        """
        for d in sorted(self.home.sandboxes_dir.iterdir()):
            meta = d / "sandbox.json"
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                shutil.rmtree(d, ignore_errors=True)
                continue
            if info.get("state") == SandboxState.HIBERNATED.value and info.get("last_checkpoint"):
                sb = Sandbox(self, d.name, base_digest=info["image"],
                             disk_size=info["disk_size"], memory_mb=info["memory_mb"],
                             cpus=info["cpus"], parent=info.get("parent_checkpoint"))
                sb.last_checkpoint = info["last_checkpoint"]
                sb.created = info.get("created", sb.created)
                sb._state = SandboxState.HIBERNATED
                self._sandboxes[sb.id] = sb
            else:
                shutil.rmtree(d, ignore_errors=True)
