"""The worker library: sandboxes, checkpoints and forks on one machine.

A :class:`Worker` owns one forkyard home.  Everything the control plane and
the CLI do to VMs goes through it.  QEMU processes die with the process that
owns the worker (see ``forkyard.vm._spawn``), and :meth:`Worker.close` stops
them earlier.

The worker decides *what* runs (which image or checkpoint, which parts to
fetch: ``_parts``); each :class:`Sandbox` runs its VM and captures its
checkpoints, which the worker's :class:`Recorder` catalogues.  They talk only
through public methods and frozen values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from forkyard.checkpoint import BootRef, Checkpoint, LocalCheckpoints, PartRef
from forkyard.checkpoint.ram_images import RamImages
from forkyard.checkpoint.recorder import Recorder
from forkyard.config import Home
from forkyard.errors import (
    CheckpointError,
    CheckpointNotFound,
    ImageNotFound,
    IntegrityError,
    SandboxNotFound,
    SandboxStateError,
    StoreError,
    VMError,
)
from forkyard.host.setup import HostInfo, ensure_host
from forkyard.image import ImageCatalog, ImageInfo, MinimalSource, build_image
from forkyard.net import NetPlane
from forkyard.store import BlobCache, BlobStore, ObjectStore, open_store
from forkyard.tools import qemu_system
from forkyard.vm.cgroup import sweep_orphans
from forkyard.vm.devices import CURRENT_PROFILE, NET_PROFILE
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape
from forkyard.vm.ram import RamFile
from forkyard.wire.ids import new_sandbox_id
from forkyard.wire.network import NetworkMode, NetworkSpec
from forkyard.worker._compat import check_compatible
from forkyard.worker._home import hibernated_records, keep_logs, lock_home, sweep_leftovers
from forkyard.worker._parts import PartFetcher
from forkyard.worker._record import (
    SandboxSpec,
    disk_size_for,
    spec_of_checkpoint,
    spec_of_record,
)
from forkyard.worker._sandbox import Chain, Sandbox, SandboxState
from forkyard.worker._store_side import StoreSide
from forkyard.worker._stream import StateStream
from forkyard.worker._templates import TemplateIndex, TemplateKey, Templates

__all__ = ["Worker"]

log = logging.getLogger("forkyard.worker")
BUILTIN_IMAGES = {"minimal": MinimalSource}
_BOOT_TIMEOUT = 180.0  # a TCG boot is ~3 s, but CI machines are shared and slow


class Worker(StoreSide):
    def __init__(
        self,
        home: Home | str | Path | None = None,
        *,
        name: str | None = None,
        store: str | ObjectStore | None = None,
        install: bool = True,
        log: Callable[[str], None] | None = None,
        confine: bool = True,
        dns_upstream: tuple[str, int] | None = None,
        protect_out: Sequence[str] = (),
    ) -> None:
        """``dns_upstream``: where the sandboxes' resolver forwards (default: the host's
        first nameserver); ``protect_out``: CIDRs no sandbox may reach whatever its
        rules (the control plane's address; this host's own are always in)."""
        # confine: False only to measure what the jail costs (benchmarks/bench_confine.py)
        self.confine = confine
        self._net_options = (dns_upstream, tuple(protect_out))
        self.home = home if isinstance(home, Home) else Home.at(home)
        self.home.ensure()
        self._home_lock = lock_home(self.home)
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
        dns_upstream, protect = self._net_options
        # claims this worker's address block and removes what a dead one left there
        self.net = NetPlane(str(self.home.root.resolve()), dns_upstream=dns_upstream,
                            protect=protect)
        self.images = ImageCatalog(self.home)
        self.checkpoints = LocalCheckpoints(self.home.checkpoints_dir)
        self.blobs = BlobCache(self.home.cache_dir / "blobs")
        self._parts = PartFetcher(self.images, self.blobs, self.blobstore, worker=self.name)
        self.ram_images = RamImages(self.blobs, self.blobstore)
        self._recorder = Recorder(self.blobs, self.checkpoints, worker=self.name,
                                  images=self.ram_images)
        self._sandboxes: dict[str, Sandbox] = {}
        self._warned_net = False
        self._lock = threading.Lock()
        self._image_lock = threading.Lock()
        self._closed = False
        self._templates = Templates(TemplateIndex(self.home.root / "templates", self.store),
                                    self.checkpoints, resolve=self.resolve_checkpoint,
                                    publish=self.publish)
        self._revive_hibernated()
        self._sweep()
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
        disk_size: int | None = None,
        cold: bool = False,
        sandbox_id: str | None = None,
        timeout: float = _BOOT_TIMEOUT,
        network: NetworkSpec | None = None,
    ) -> Sandbox:
        """A new sandbox of ``image`` whose agent answers, with ``disk_size`` bytes of disk.

        ``network``: its mode and egress rules (default: ``outbound`` under the
        default rules; on a worker that cannot make networks, not root, none).

        It forks the image's template (a checkpoint of the machine just booted)
        when this worker has one or the store does; otherwise it boots, and that
        first boot leaves the template behind.  ``cold=True`` always boots (and
        makes no template).  Either way the guest gets its own hostname (the
        sandbox id), machine-id and RNG state.
        """
        self._check_open()
        info = self.image(image)
        settings = self.home.settings()
        disk = disk_size_for(disk_size, info.size)
        wanted = self._network_for(network)
        # a template holds no caller's rules: it boots under the default ones
        boot_net = wanted if cold or wanted is None else NetworkSpec()
        spec = SandboxSpec(base_digest=info.digest, disk_size=disk, base_size=info.size,
                           memory_mb=memory_mb or settings.memory_mb,
                           cpus=cpus or settings.cpus, parent=None, network=boot_net)
        shape = self._shape(spec)
        key = self._template_key(info.digest, shape)
        sb = None if cold else self._fork_template(key, sandbox_id, timeout, wanted)
        if sb is None:
            sb = self._boot(spec, shape, info.path, sandbox_id, timeout)
            if not cold:
                self._templates.capture(sb, key)
        try:
            if wanted is not None and sb.network != wanted:
                sb.set_network(wanted)
            sb.new_identity()
        except BaseException:
            self._discard(sb)
            raise
        return sb

    def warm(self, image: str = "minimal", *, memory_mb: int | None = None,
             cpus: int | None = None, disk_size: int | None = None) -> str:
        """Make sure ``image`` has a template for this shape (published); its checkpoint id."""
        sb = self.create(image, memory_mb=memory_mb, cpus=cpus, disk_size=disk_size)
        sb.destroy()
        self.wait_background()
        cp = self._templates.index.local(self._template_key(sb.base_digest, self._shape(sb.spec)))
        if cp is None:  # the boot's checkpoint failed (logged): the create booted
            raise CheckpointNotFound(f"template of {image}")
        return cp

    def _boot(self, spec: SandboxSpec, shape: VMShape, base: Path, sandbox_id: str | None,
              timeout: float) -> Sandbox:
        """Boot a new sandbox from its base image and grow its root filesystem."""
        sb = self._register(sandbox_id, spec)
        try:
            active = sb.prepare((), self._host_boot())
            boot = BootSpec(self.host.kernel.path, self.host.initrd.path)
            vm = self._vm(sb, shape, boot, DiskChain(base, (), active))
            sb.start(vm, incoming=None, timeout=timeout)
            if spec.disk_size > spec.base_size:
                sb.grow_root_fs()
        except BaseException:
            self._discard(sb)
            raise
        return sb

    # ------------------------------------------------------------------
    # templates
    def _shape(self, spec: SandboxSpec) -> VMShape:
        """The machine a new sandbox of ``spec`` boots as on this host."""
        devices = (NET_PROFILE if spec.network is not None else CURRENT_PROFILE).name
        return VMShape(spec.memory_mb, spec.cpus, self.host.machine_type, self.host.accel,
                       qemu=self.host.qemu_version, disk_size=spec.disk_size, devices=devices)

    def _network_for(self, network: NetworkSpec | None) -> NetworkSpec | None:
        """What a create's ``network`` means here: None for mode none."""
        if network is None:
            if not self.net.available:
                if not self._warned_net:
                    self._warned_net = True
                    log.warning("worker %s is not root: sandboxes get no network", self.name)
                return None
            network = NetworkSpec()
        return None if network.mode is NetworkMode.NONE else network

    def _template_key(self, base_digest: str, shape: VMShape) -> TemplateKey:
        return TemplateKey(base_digest, self.host.kernel.digest, self.host.initrd.digest,
                           self.host.agent_digest, shape, self._host_boot().cmdline)

    def _fork_template(self, key: TemplateKey, sandbox_id: str | None,
                       timeout: float, network: NetworkSpec | None) -> Sandbox | None:
        cp = self._templates.find(key)
        if cp is None:
            return None
        try:
            sb = self.fork(cp, sandbox_id=sandbox_id, timeout=timeout, network=network)
        except (CheckpointError, IntegrityError, StoreError, VMError) as exc:
            # a template is only a shortcut: a broken one costs a boot, not the create
            log.warning("template %s unusable, booting instead: %s", key.digest[:12], exc)
            self._templates.index.forget(key)
            return None
        if self._templates.index.local(key) != cp.id:  # fetched: next time it is local
            self._templates.index.remember(key, cp.id)
        return sb

    def wait_background(self, timeout: float = 300.0) -> None:
        """Wait for template publishes under way (tests, benchmarks, close)."""
        self._templates.wait(timeout)

    def fork(
        self,
        checkpoint: Checkpoint | str,
        *,
        sandbox_id: str | None = None,
        timeout: float = _BOOT_TIMEOUT,
        network: NetworkSpec | None = None,
    ) -> Sandbox:
        """A new sandbox that continues exactly from ``checkpoint``.

        It keeps the checkpoint's network mode and rules; ``network`` replaces
        the rules (the mode is the checkpoint's machine: a NIC or none).
        """
        self._check_open()
        cp = self.resolve_checkpoint(checkpoint)
        sb = self._register(sandbox_id, spec_of_checkpoint(cp, network))
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
                *, timeout: float = _BOOT_TIMEOUT, network: NetworkSpec | None = None) -> None:
        """Revert ``sandbox`` in place: same id, the machine of ``checkpoint``."""
        cp = self.resolve_checkpoint(checkpoint)
        self._check_compatible(cp)  # before the old VM goes
        with sandbox.restarting(spec_of_checkpoint(cp, network)):
            self._launch_from(sandbox, cp, timeout=timeout)

    def wake(self, sandbox_id: str, *, checkpoint: Checkpoint | str | None = None,
             timeout: float = _BOOT_TIMEOUT, network: NetworkSpec | None = None) -> Sandbox:
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
                return self.fork(cp, sandbox_id=sandbox_id, timeout=timeout, network=network)
        sb = self.get(sandbox_id)
        if sb.state is not SandboxState.HIBERNATED or sb.last_checkpoint is None:
            raise SandboxStateError(sb.id, sb.state.value, "wake")
        # rules set while it was hibernated count over the checkpoint's
        self.restore(sb, sb.last_checkpoint, timeout=timeout, network=network or sb.network)
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
        self.wait_background(timeout=60.0)
        for sb in self.list():
            with contextlib.suppress(Exception):
                if sb.state is SandboxState.HIBERNATED:
                    continue
                sb.destroy()
        self.net.close()
        self.ram_images.close()
        os.close(self._home_lock)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def supported_machines(self) -> set[str]:
        return qemu_system.supported_machines(self.home.host_dir / "machines.json",
                                              self.host.qemu_version)

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
        # v3: the device state is small and read whole; RAM is the mapped image
        parts = self._parts.gather(cp, stream_state=m.ram is None)
        ram = ram_ready = None
        try:
            if m.ram is not None:
                # QEMU starts while the image fills; it loads nothing before ready()
                build = self.ram_images.open(m.ram, what=f"checkpoint {cp.short_id}")
                # an image already sealed needs no wait, nor QEMU's smaps read
                ram, ram_ready = build.image, (build.ready if build.filling else None)
            active = sb.prepare(m.layers, m.boot)
            # the recorded machine, run (and later saved again) by this host's QEMU
            shape = replace(m.vm, qemu=self.host.qemu_version)
            kernel, initrd = parts.kernel.result(), parts.initrd.result()
            boot = BootSpec(kernel, initrd, m.boot.cmdline)
            state = parts.state
            if isinstance(state, Path) and parts.disks.done():
                base, layers = parts.disks.result()
                vm = self._vm(sb, shape, boot, DiskChain(base, layers, active), ram, ram_ready)
                ram = None  # the VM holds it now
                sb.start(vm, incoming=state, timeout=timeout)
            else:
                vm = self._vm(sb, shape, boot, DiskChain(None, (), active), ram, ram_ready)
                ram = None

                def pending_chain() -> Chain:
                    if isinstance(state, StateStream):
                        state.finish(timeout)
                    return parts.disks.result(timeout)

                incoming = state if isinstance(state, Path) else state.take_fd()
                sb.start(vm, incoming=incoming, timeout=timeout, pending_chain=pending_chain)
        finally:
            parts.close()
            if ram is not None:
                ram.release()
        # every part is here now: later forks of it on this worker stay local
        self.checkpoints.add(m)

    def _check_compatible(self, cp: Checkpoint) -> None:
        check_compatible(cp, self.host, self.supported_machines)

    # ------------------------------------------------------------------
    # internals
    def _host_boot(self) -> BootRef:
        k, i = self.host.kernel, self.host.initrd
        return BootRef(PartRef(k.digest, k.size), PartRef(i.digest, i.size),
                       BootSpec(k.path, i.path).cmdline)

    def _vm(self, sb: Sandbox, shape: VMShape, boot: BootSpec, disk: DiskChain,
            ram: RamFile | None = None, ram_ready: Callable[[], None] | None = None
            ) -> QemuVM:
        """The VM of ``sb``; a shape with a NIC gets a network namespace of its own."""
        net = None
        if "net" in shape.profile.roles():
            net = self.net.attach(sb.id, sb.network or NetworkSpec())
        sb.use_network(net)  # the sandbox removes it with the VM
        return QemuVM(
            ram=ram,
            ram_ready=ram_ready,
            name=sb.id,
            workdir=sb.dir,
            agent_socket=self.home.run_dir / f"{sb.id}.agent",
            shape=shape,
            boot=boot,
            disk=disk,
            confine=self.confine,
            tap_fd=None if net is None else net.tap_fd,
        )

    def _new_sandbox(self, sid: str, spec: SandboxSpec, *,
                     state: SandboxState = SandboxState.STARTING,
                     last_checkpoint: str | None = None, created: str | None = None) -> Sandbox:
        return Sandbox(sid, spec, directory=self.home.sandboxes_dir / sid,
                       recorder=self._recorder, restore_with=self._restore_default,
                       on_destroy=self._forget, state=state, last_checkpoint=last_checkpoint,
                       created=created)

    def _restore_default(self, sandbox: Sandbox, checkpoint: Checkpoint | str) -> None:
        self.restore(sandbox, checkpoint)

    def _register(self, sandbox_id: str | None, spec: SandboxSpec) -> Sandbox:
        sid = sandbox_id or new_sandbox_id()
        with self._lock:
            if sid in self._sandboxes:
                raise SandboxStateError(sid, self._sandboxes[sid].state.value, "create")
            sb = self._new_sandbox(sid, spec)
            self._sandboxes[sid] = sb
        sb.dir.mkdir(parents=True, exist_ok=False)
        return sb

    def _discard(self, sb: Sandbox) -> None:
        """Drop a sandbox that failed to start, keeping its logs for a post-mortem."""
        sb.abort_start()
        keep_logs(self.home, sb.dir)
        self._forget(sb)

    def _forget(self, sb: Sandbox) -> None:
        with self._lock:
            self._sandboxes.pop(sb.id, None)
        shutil.rmtree(sb.dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxStateError("-", "closed", f"use worker {self.name}")

    def _sweep(self) -> None:
        """What an earlier process on this home left half written goes (it crashed)."""
        files = sweep_leftovers(self.home)
        try:
            uploads = self.store.own_uploads(self.home.root / "uploads")
        except StoreError as exc:  # the store may be down now; the next start retries
            log.warning("could not clean up earlier uploads to %s: %s", self.store.url, exc)
            uploads = 0
        groups = sweep_orphans() if self.confine and os.geteuid() == 0 else 0
        if files or uploads or groups:
            log.info("swept %d temp file(s), %d upload(s), %d cgroup(s) left by an earlier "
                     "process", files, uploads, groups)

    def _revive_hibernated(self) -> None:
        """Hibernated sandboxes of an earlier process come back (others are gone)."""
        for d, info in hibernated_records(self.home):
            sb = self._new_sandbox(d.name, spec_of_record(info), state=SandboxState.HIBERNATED,
                                   last_checkpoint=info["last_checkpoint"],
                                   created=info.get("created"))
            self._sandboxes[sb.id] = sb
