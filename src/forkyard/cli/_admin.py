"""Commands on worker homes directly (no control plane): ``setup``, ``image build/ls``.

``--home`` names a *worker* home.  When it is a *cluster* home instead (it has
a ``cluster.json`` or a ``workers/`` directory, as ``forkyard up`` makes), the
command applies to every worker home under ``<home>/workers/`` (or the one
``--worker`` names): an image is built once and imported into each of them,
so every worker has the same base under the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, home_dir, interactive
from forkyard.cli._output import console, human_bytes, print_json, short, steps, table, when
from forkyard.config import Home
from forkyard.image import ImageInfo
from forkyard.sdk.cluster import cluster_path

__all__ = ["image_app", "register", "target_homes"]

image_app = typer.Typer(help="Base images of worker homes.", no_args_is_help=True)


def target_homes(home: Path, worker: str | None) -> list[tuple[str | None, Path]]:
    """(worker name or None, worker home) pairs a home-level command applies to."""
    workers_dir = home / "workers"
    if not (cluster_path(home).exists() or workers_dir.is_dir()):
        if worker is not None:
            raise typer.BadParameter(f"{home} is not a cluster home", param_hint="--worker")
        return [(None, home)]
    found = sorted(p for p in workers_dir.iterdir() if p.is_dir()) if workers_dir.is_dir() \
        else []
    if worker is not None:
        found = [p for p in found if p.name == worker]
        if not found:
            raise typer.BadParameter(f"no worker {worker!r} in {home}", param_hint="--worker")
    if not found:
        raise typer.BadParameter(
            f"{home} is a cluster home without worker homes yet; run `forkyard up` first, or "
            "pass a worker home", param_hint="--home")
    return [(p.name, p) for p in found]


WorkerOpt = Annotated[str | None, typer.Option(
    "--worker", "-w", help="In a cluster home: only this worker's home.")]


def _image_json(info: ImageInfo, worker: str | None, e2fsprogs: str | None = None
                ) -> dict[str, Any]:
    return {
        "worker": worker,
        "digest": info.digest,
        "names": list(info.names),
        "size": info.size,
        "path": str(info.path),
        "source": info.source,
        "reproducible": info.reproducible,
        "e2fsprogs": info.e2fsprogs or e2fsprogs,
        "created": info.created,
        "files": info.file_count,
    }


def setup(
    home: HomeOpt = None,
    worker: WorkerOpt = None,
    install: Annotated[bool, typer.Option(
        "--install/--no-install", help="Install missing Debian packages with apt.")] = True,
    json_: JsonOpt = False,
) -> None:
    """Make this machine ready to run sandboxes: packages, kernel, agent, initramfs."""
    from forkyard.host.setup import ensure_host

    results = []
    for name, path in target_homes(home_dir(home), worker):
        with steps(enabled=interactive() and not json_) as step:
            info = ensure_host(Home.at(path), install=install, log=step)
        results.append((name, path, info))
    if json_:
        print_json([{"worker": n, "home": str(p), **i.to_json()} for n, p, i in results])
        return
    out = console()
    for name, path, info in results:
        out.print(f"[green]ready[/green] {path}" + (f" (worker {name})" if name else ""))
        out.print(f"  kernel     {info.kernel_release}  sha256:{short(info.kernel.digest)}")
        out.print(f"  initramfs  sha256:{short(info.initrd.digest)}")
        out.print(f"  qemu       {info.qemu_version}  {info.machine_type}  accel={info.accel}")
        out.print(f"  e2fsprogs  {info.e2fsprogs}")


@image_app.command("build")
def image_build(
    source: Annotated[str | None, typer.Argument(
        help="'minimal' (default) or '-' for a root-filesystem tarball on stdin.",
        show_default=False)] = None,
    from_dir: Annotated[Path | None, typer.Option("--from-dir", help="A root tree.")] = None,
    from_tar: Annotated[str | None, typer.Option(
        "--from-tar", help="A rootfs tarball (docker export; gz/bz2/xz/zst), - = stdin.")]
    = None,
    debian: Annotated[bool, typer.Option("--debian", help="mmdebstrap a Debian minbase.")]
    = False,
    suite: Annotated[str, typer.Option("--suite", help="Debian suite.")] = "bookworm",
    packages: Annotated[str | None, typer.Option(
        "--packages", help="Comma-separated Debian packages (with --debian).")] = None,
    mirror: Annotated[str | None, typer.Option("--mirror", help="Debian mirror.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Name to tag the image with (default: 'minimal' or 'debian' for those "
        "sources, so `create --image NAME` finds it).")] = None,
    stock: Annotated[bool, typer.Option(
        "--stock", help="Plain mkfs (random UUID, real times): not reproducible.")] = False,
    size_mb: Annotated[int | None, typer.Option("--size-mb", min=16)] = None,
    home: HomeOpt = None,
    worker: WorkerOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Build a base image into the worker home(s) of --home; prints digest, size, path."""
    from forkyard.image import (
        DebianSource,
        DirSource,
        ImageCatalog,
        MinimalSource,
        TarSource,
        build_image,
    )
    from forkyard.image.sources import Source
    from forkyard.tools.mkfs import e2fsprogs_version

    chosen = [s for s in (source is not None, from_dir is not None, from_tar is not None,
                          debian) if s]
    if len(chosen) > 1:
        raise typer.BadParameter("give one source: minimal, -, --from-dir, --from-tar or "
                                 "--debian")
    if packages is not None and not debian:
        raise typer.BadParameter("--packages needs --debian", param_hint="--packages")
    src: Source
    if from_dir is not None:
        src = DirSource(from_dir)
    elif from_tar is not None or source == "-":
        src = TarSource(from_tar or "-")
    elif debian:
        pkgs = tuple(p.strip() for p in (packages or "").split(",") if p.strip())
        src = DebianSource(suite=suite, packages=pkgs, mirror=mirror)
        name = name or "debian"
    elif source in (None, "minimal"):
        src = MinimalSource()
        name = name or "minimal"
    else:
        raise typer.BadParameter(f"unknown source {source!r} (minimal or -)",
                                 param_hint="SOURCE")
    targets = target_homes(home_dir(home), worker)
    first_name, first_home = targets[0]
    with steps(enabled=interactive() and not json_) as step:
        info = build_image(Home.at(first_home).ensure(), src, name=name, stock=stock,
                           size_mb=size_mb, progress=step)
        built = [(first_name, info)]
        if len(targets) > 1:
            meta = ImageCatalog(Home.at(first_home)).meta(info.digest)
            for wname, whome in targets[1:]:
                step(f"importing into worker {wname}")
                catalog = ImageCatalog(Home.at(whome))
                built.append((wname, catalog.import_blob(info.digest, info.path, meta=meta,
                                                         name=name)))
    e2fs = info.e2fsprogs or e2fsprogs_version()
    if json_:
        print_json([_image_json(i, n, e2fs) for n, i in built])
        return
    out = console()
    out.print(f"digest     sha256:{info.digest}")
    out.print(f"size       {info.size} bytes ({human_bytes(info.size)})")
    out.print(f"e2fsprogs  {e2fs}")
    out.print(f"source     {info.source}{'' if info.reproducible else '  (not reproducible)'}")
    if info.names:
        out.print(f"names      {', '.join(info.names)}")
    for wname, i in built:
        out.print(f"path       {i.path}" + (f"  (worker {wname})" if wname else ""))


@image_app.command("warm")
def image_warm(
    image: Annotated[str, typer.Argument(help="Image name or digest.")] = "minimal",
    memory: Annotated[int | None, typer.Option("--memory", "-m", min=64, help="MiB.")] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", min=1)] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="Disk size, e.g. 4G.")] = None,
    home: HomeOpt = None,
    worker: WorkerOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Boot IMAGE once in the worker home(s) of --home and keep it as the template later
    creates of that image and shape fork (published to the worker's store)."""
    from forkyard.sdk._ops import disk_bytes
    from forkyard.worker import Worker

    try:
        size = None if disk is None else disk_bytes(disk)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--disk") from None
    done = []
    for name, path in target_homes(home_dir(home), worker):
        with Worker(path, name=name) as w:
            done.append((name, w.warm(image, memory_mb=memory, cpus=cpus, disk_size=size)))
    if json_:
        print_json([{"worker": n, "template": cp} for n, cp in done])
        return
    for n, cp in done:
        console().print(cp + (f"  (worker {n})" if n else ""))


@image_app.command("ls")
def image_ls(home: HomeOpt = None, worker: WorkerOpt = None, json_: JsonOpt = False) -> None:
    """List the base images of the worker home(s) of --home."""
    from forkyard.image import ImageCatalog

    rows = [(n, i) for n, p in target_homes(home_dir(home), worker)
            for i in ImageCatalog(Home.at(p)).list()]
    if json_:
        print_json([_image_json(i, n) for n, i in rows])
        return
    t = table("worker", "digest", "names", "size", "source", "repro", "files", "created")
    for n, i in rows:
        t.add_row(n or "-", short(i.digest, 16), ", ".join(i.names) or "-",
                  human_bytes(i.size), i.source, "yes" if i.reproducible else "no",
                  str(i.file_count), when(i.created))
    console().print(t)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Machine")(setup)
    app.add_typer(image_app, name="image", rich_help_panel="Machine")
