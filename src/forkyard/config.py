"""Where forkyard keeps its files, and the few settings a user can change.

A *home* (``$FORKYARD_HOME``, default ``~/.forkyard``) belongs to one worker.
Its layout is fixed here (the paths) and by the modules named below (what
they put there)::

    config.toml          optional user settings (see Settings)
    worker.lock          flock(2) held by the one worker using this home
    host/                made by `forkyard setup` (forkyard.host.setup):
      vmlinuz-<sha16>      guest kernel, named by its digest
      initramfs-<sha16>    initramfs with the guest agent
      host.json            what setup found and installed
      machines.json        QEMU machine types, probed once by the worker
      .setup.lock
    images/              base-image catalog (forkyard.image.catalog), private:
      blobs/<sha256>.ext4  + meta/<sha256>.json, meta/<sha256>.files.json,
      names.json, .lock
    sandboxes/<id>/      one directory per sandbox: sandbox.json, disk-<n>.qcow2,
                         state-<n>.tmp while a checkpoint is taken, console.log,
                         qemu.log, qemu.argv.json
    failed/<id>/         logs of the last sandboxes that failed to start
    checkpoints/<id>/    local checkpoint catalog: manifest.json
    cache/blobs/         verified content cache (forkyard.store.cache), private:
      <ab>/<sha256>        layers, VM states, kernels and bases by digest (0400)
      .locks/, .streams/   per-digest locks; states being streamed in
    store/               the default object store (file://) when none is configured
                         (forkyard.store.local), private
    tmp/                 scratch on the same filesystem, private: image builds,
                         checkpoint exports and imports, zero-<size>.raw

``images/``, ``cache/`` and ``tmp/`` (and the store and cache directories
their owners make) are 0700 whatever the umask: they hold guest disks and
memory, which only the worker may read.

Unix sockets (the guest agents' ``<id>.agent``) live under a short per-home
directory in /tmp (:attr:`Home.run_dir`) because socket paths are limited to
107 bytes and homes (pytest tmp dirs) can be long.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from forkyard._fs import private_dir
from forkyard.errors import SetupError

__all__ = ["Home", "Settings", "default_home"]


def default_home() -> Path:
    env = os.environ.get("FORKYARD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".forkyard"


@dataclass(frozen=True, slots=True)
class Settings:
    """User settings from ``config.toml``; environment variables win."""

    store_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    memory_mb: int = 256
    cpus: int = 1
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> Home:
        path = Path(root).expanduser() if root is not None else default_home()
        return cls(path.resolve())

    # --- fixed layout -------------------------------------------------
    @property
    def host_dir(self) -> Path:
        return self.root / "host"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def sandboxes_dir(self) -> Path:
        return self.root / "sandboxes"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def run_dir(self) -> Path:
        """Short private directory for unix sockets (see module docstring)."""
        tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"forkyard-{os.getuid()}-{tag}"

    def ensure(self) -> Home:
        for d in (self.root, self.host_dir, self.sandboxes_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.images_dir, self.cache_dir, self.tmp_dir):
            private_dir(d)
        run = self.run_dir
        run.mkdir(mode=0o700, exist_ok=True)
        st = run.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SetupError(f"socket directory {run} is not private to this user")
        return self

    def settings(self) -> Settings:
        data: dict[str, object] = {}
        if self.config_file.exists():
            with open(self.config_file, "rb") as f:
                data = tomllib.load(f)
        store = data.get("store", {})
        vm = data.get("vm", {})
        if not isinstance(store, dict) or not isinstance(vm, dict):
            raise SetupError(f"{self.config_file}: [store] and [vm] must be tables")
        return Settings(
            store_url=os.environ.get("FORKYARD_STORE") or _opt_str(store.get("url")),
            s3_endpoint_url=os.environ.get("FORKYARD_S3_ENDPOINT")
            or _opt_str(store.get("s3_endpoint_url")),
            s3_region=_opt_str(store.get("s3_region")),
            memory_mb=int(str(vm.get("memory_mb", 256))),
            cpus=int(str(vm.get("cpus", 1))),
            extra=data,
        )

    def default_store_url(self) -> str:
        return self.settings().store_url or f"file://{self.store_dir}"


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
