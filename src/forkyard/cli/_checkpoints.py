"""Checkpoint commands: create/ls/show/rm, the store, and self-contained export/import.

``forkyard checkpoint SANDBOX`` checkpoints a sandbox of the running cluster;
``checkpoint ls|show|rm`` work against the cluster when ``--home`` (or
``--url``) names one, and otherwise against the worker home itself.  ``show``
and ``store ls`` read manifests straight from the object store, so they also
answer for checkpoints no control plane knows.

``export`` and ``import`` run the worker library on this machine: on a cluster
home they use a private tools home (``<home>/tools``) that shares the cluster's
store — never a running worker's home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from forkyard.checkpoint import Checkpoint, Manifest
from forkyard.checkpoint.archive import fetch_manifest, list_published
from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect, home_dir
from forkyard.cli._output import console, human_bytes, print_json, short, table, when
from forkyard.cli._sandboxes import checkpoint as create_checkpoint
from forkyard.cli._sandboxes import checkpoints as list_cluster_checkpoints
from forkyard.config import Home
from forkyard.errors import CheckpointNotFound
from forkyard.sdk import _ops
from forkyard.sdk.cluster import load_cluster
from forkyard.store import ObjectStore, open_store

__all__ = ["checkpoint_app", "register"]

StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="Object store URL (default: the cluster's, else the home's config).")]


class _CheckpointGroup(TyperGroup):
    """``checkpoint SANDBOX`` creates; ``checkpoint ls|show|rm`` manage."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["create", *args]
        return list(super().parse_args(ctx, args))


checkpoint_app = typer.Typer(
    cls=_CheckpointGroup,
    help="Checkpoint a sandbox (`checkpoint SANDBOX`), or list/show/remove checkpoints.",
    no_args_is_help=True,
)
checkpoint_app.command("create", help="Checkpoint a running sandbox of the cluster.")(
    create_checkpoint)
store_app = typer.Typer(help="The object store checkpoints are published to.",
                        no_args_is_help=True)


def _cluster_running(home: Path, url: str | None) -> bool:
    return url is not None or load_cluster(home) is not None


def _store(home: Path, store_url: str | None) -> ObjectStore:
    if store_url is not None:
        return open_store(store_url, Home.at(home).settings())
    cluster = load_cluster(home)
    if cluster is not None and cluster.store:
        return open_store(cluster.store)
    h = Home.at(home)
    return open_store(h.default_store_url(), h.settings())


def _manifest_json(cp: Checkpoint, **extra: Any) -> dict[str, Any]:
    return {"id": cp.id, **cp.manifest.to_json(), **extra}


@checkpoint_app.command("ls")
def ls(home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
       json_: JsonOpt = False) -> None:
    """List checkpoints (the cluster's, or a worker home's own)."""
    h = home_dir(home)
    if _cluster_running(h, url):
        list_cluster_checkpoints(home=home, url=url, token=token, json_=json_)
        return
    from forkyard.checkpoint import LocalCheckpoints

    local = LocalCheckpoints(Home.at(h).checkpoints_dir)
    cps = local.list()
    if json_:
        print_json([_manifest_json(c, published=local.flag(c.id, "published"))
                    for c in cps])
        return
    t = table("id", "created", "sandbox", "name", "changed", "published")
    for c in cps:
        t.add_row(short(c.id), when(c.created), c.sandbox_id, c.name or "-",
                  human_bytes(c.changed_bytes), local.flag(c.id, "published") or "-")
    console().print(t)


@checkpoint_app.command("show")
def show(checkpoint_id: Annotated[str, typer.Argument(help="Checkpoint id or prefix.")],
         home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
         store: StoreOpt = None, json_: JsonOpt = False) -> None:
    """Print a checkpoint's manifest: every part by digest and size, and the VM shape.

    With a cluster, the control plane answers (only your own checkpoints; a
    removed one is gone); on a worker home, its catalog, then its store.
    """

    h = home_dir(home)
    if _cluster_running(h, url) and store is None:
        http = connect(home, url, token)
        info = http.call(_ops.get_checkpoint(checkpoint_id))  # a prefix becomes the id
        # verified here too: the id is the digest of these bytes
        manifest = Manifest.parse(http.call(_ops.checkpoint_manifest(info.id)),
                                  expect_id=info.id)
        cp, where = Checkpoint.of(manifest), http.config.url
    else:
        cp, where = _show_local(h, checkpoint_id, store)
    if json_:
        print_json(_manifest_json(cp, source=where))
        return
    _print_manifest(cp, where)


def _show_local(h: Path, checkpoint_id: str, store: str | None) -> tuple[Checkpoint, str]:
    from forkyard.checkpoint import LocalCheckpoints

    try:
        cp = LocalCheckpoints(Home.at(h).checkpoints_dir).get(checkpoint_id)
        where = str(h)
    except CheckpointNotFound:
        s = _store(h, store)
        manifest = fetch_manifest(s, checkpoint_id)
        cp, where = Checkpoint.of(manifest), s.url
    return cp, where


def _print_manifest(cp: Checkpoint, where: str) -> None:
    m: Manifest = cp.manifest
    out = console()
    out.print(f"checkpoint  {cp.id}")
    out.print(f"from        {where}")
    out.print(f"created     {m.created}   sandbox {m.sandbox}   name {m.name or '-'}")
    out.print(f"parent      {m.parent or '-'}")
    v = m.vm
    out.print(f"vm          {v.machine} {v.accel} cpu={v.cpu} {v.memory_mb} MiB x{v.cpus} "
              f"devices={v.devices} (saved by QEMU {v.qemu})")
    if m.ram is not None:
        new, shared = m.extra.get("ram_new_bytes"), m.extra.get("ram_shared_bytes")
        out.print(f"ram         {m.format}: {human_bytes(m.ram.size)} image, "
                  f"{human_bytes(m.ram.stored_bytes)} non-zero in {len(m.ram.chunks)} chunks "
                  f"of {human_bytes(m.ram.chunk_size)}")
        if new is not None and shared is not None:
            out.print(f"stored      RAM new to this checkpoint {human_bytes(int(new))}, "
                      f"shared with earlier checkpoints {human_bytes(int(shared))}")
    t = table("part", "sha256", "size")
    for role, ref in m.parts():
        if role.startswith("state."):  # v2: one row for the state, not one per chunk
            if role == "state.0":
                t.add_row(f"state ({len(m.state_chunks)} chunks)", m.state.digest,
                          human_bytes(m.state.size))
            continue
        if role.startswith("ram."):  # v3: one row for the image
            if role == "ram.0" and m.ram is not None:
                t.add_row(f"ram ({len(m.ram.chunks)} chunks)", m.ram.id,
                          human_bytes(m.ram.stored_bytes))
            continue
        t.add_row(role, ref.digest, human_bytes(ref.size))
    out.print(t)


@checkpoint_app.command("rm")
def rm(checkpoint_id: Annotated[str, typer.Argument(help="Checkpoint id or prefix.")],
       home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Forget a checkpoint (published store objects are immutable and stay)."""
    h = home_dir(home)
    if _cluster_running(h, url):
        connect(home, url, token).call(_ops.delete_checkpoint(checkpoint_id))
        return
    from forkyard.checkpoint import LocalCheckpoints

    local = LocalCheckpoints(Home.at(h).checkpoints_dir)
    local.remove(local.resolve(checkpoint_id))


@store_app.command("ls")
def store_ls(home: HomeOpt = None, store: StoreOpt = None, json_: JsonOpt = False) -> None:
    """List the checkpoints published in the store, with the bytes each part takes."""
    from forkyard.checkpoint.archive import stored_bytes

    s = _store(home_dir(home), store)
    rows = []
    for cid in list_published(s):
        m = fetch_manifest(s, cid)
        own = stored_bytes(s, m)
        rows.append((cid, m, own))
    rows.sort(key=lambda r: r[1].created)
    if json_:
        print_json([{"id": cid, "created": m.created, "sandbox": m.sandbox, "name": m.name,
                     "base": m.base.digest, "stored_bytes": own} for cid, m, own in rows])
        return
    t = table("id", "created", "sandbox", "name", "base", "stored", title=s.url)
    for cid, m, own in rows:
        t.add_row(short(cid), when(m.created), m.sandbox, m.name or "-", short(m.base.digest),
                  human_bytes(own))
    console().print(t)


def _tools_worker(home: Path, store: str | None) -> Any:
    """A Worker for export/import that never shares a running worker's home."""
    from forkyard.worker import Worker

    cluster = load_cluster(home)
    if cluster is not None or (home / "workers").is_dir():
        url = store or (cluster.store if cluster is not None else None)
        return Worker(home / "tools", name="tools", store=url)
    return Worker(home, store=store)


def export(
    checkpoint_id: Annotated[str, typer.Argument(help="Checkpoint id or prefix.")],
    out: Annotated[Path, typer.Argument(help="The qcow2 file to write.")],
    snapshot: Annotated[str, typer.Option(help="Name of the savevm snapshot.")] = "forkyard",
    home: HomeOpt = None, store: StoreOpt = None, json_: JsonOpt = False,
) -> None:
    """Write one standalone qcow2 (no backing file) that plain QEMU resumes with -loadvm."""
    import shlex

    from forkyard.checkpoint.export import export_checkpoint

    with _tools_worker(home_dir(home), store) as w:
        result = export_checkpoint(w, checkpoint_id, out, snapshot=snapshot)
    if json_:
        print_json({"path": str(result.path), "snapshot": result.snapshot,
                    "size": result.size, "argv": result.argv})
        return
    console().print(f"wrote {result.path} ({human_bytes(result.size)}), snapshot "
                    f"{result.snapshot!r}; resume it with:")
    console().print(shlex.join(result.argv), soft_wrap=True, highlight=False)


def import_(
    path: Annotated[Path, typer.Argument(help="A qcow2 with a savevm snapshot.")],
    snapshot: Annotated[str | None, typer.Option(help="Snapshot to import.")] = None,
    base: Annotated[str | None, typer.Option(
        help="Base image (name, digest or raw file) the qcow2's clusters sit on.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="RAM (MiB) of the saved VM.")]
    = None,
    name: Annotated[str | None, typer.Option(help="Label for the checkpoint.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the store.")] = True,
    home: HomeOpt = None, store: StoreOpt = None, json_: JsonOpt = False,
) -> None:
    """Register a qcow2 with a savevm snapshot as a checkpoint (and publish it)."""
    from forkyard.checkpoint.export import import_qcow2

    with _tools_worker(home_dir(home), store) as w:
        cp = import_qcow2(w, path, snapshot=snapshot, base=base, memory_mb=memory, name=name)
        if publish:
            w.publish(cp)
    if json_:
        print_json(_manifest_json(cp, published=publish))
    else:
        console().print(cp.id)


def register(app: typer.Typer) -> None:
    panel = "Checkpoints"
    app.add_typer(checkpoint_app, name="checkpoint", rich_help_panel=panel)
    app.command("checkpoints", rich_help_panel=panel, help="List checkpoints (= checkpoint ls).")(
        list_cluster_checkpoints)
    app.add_typer(store_app, name="store", rich_help_panel=panel)
    app.command("export", rich_help_panel=panel)(export)
    app.command("import", rich_help_panel=panel)(import_)
