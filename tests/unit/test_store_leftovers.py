"""Uploads a crashed process left half done are cleaned up by the next one -- only its own.

The writer really dies (SIGKILL, in a subprocess) in the middle of an upload,
so no ``except``/``finally`` of the store runs; the next process with the
same journal (a worker's home) sweeps what it left, and nobody else's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from forkyard.store.local import STAGING_DIR, LocalStore
from forkyard.store.s3 import S3Store
from tests.fixtures.s3server import S3Server, s3_server_fixture

s3_server = s3_server_fixture()
MiB = 1024 * 1024

_DIE_MID_UPLOAD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from forkyard.store import open_store
    from forkyard.config import Settings

    url, journal, endpoint, region = sys.argv[1:5]
    store = open_store(url, Settings(s3_endpoint_url=endpoint or None, s3_region=region or None))
    if hasattr(store, "_threshold"):
        store._threshold, store._part_size = 6 * 2**20, 5 * 2**20
    store.own_uploads(Path(journal))

    class Dying:
        sent = 0
        def read(self, n=-1):
            if self.sent >= 11 * 2**20:  # two parts are out: die before completing
                os.kill(os.getpid(), signal.SIGKILL)
            self.sent += 2**20
            return os.urandom(2**20)

    store.put_stream("blobs/half", Dying())
""")


def _die_mid_upload(url: str, journal: Path, s3: S3Server | None = None) -> None:
    proc = subprocess.run([sys.executable, "-c", _DIE_MID_UPLOAD, url, str(journal),
                           s3.endpoint_url if s3 else "", s3.region if s3 else ""],
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def test_s3_multipart_upload_of_a_crashed_writer_is_aborted_by_its_next_start(
        s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    _die_mid_upload(s3_server.store_url("p", bucket=bucket), mine, s3_server)
    _die_mid_upload(s3_server.store_url("p", bucket=bucket), theirs, s3_server)
    assert s3_server.pending_uploads(bucket=bucket) == ["p/blobs/half", "p/blobs/half"]

    store = S3Store(bucket, "p", client=s3_server.client())
    assert store.own_uploads(mine) == 1
    # the other writer's upload is not ours to end (it may be in flight)
    assert s3_server.pending_uploads(bucket=bucket) == ["p/blobs/half"]
    assert store.own_uploads(mine) == 0  # nothing left to do, nothing noted twice
    assert not list(mine.iterdir())


def test_s3_torn_journal_note_is_dropped(s3_server: S3Server, tmp_path: Path) -> None:
    journal = tmp_path / "j"
    journal.mkdir()
    (journal / "x.json").write_text('{"key": ')  # a crash while writing the note
    (journal / "y.json").write_text('{"key": "p/k", "upload_id": "no-such-upload"}')
    store = S3Store(s3_server.new_bucket(), "p", client=s3_server.client())
    assert store.own_uploads(journal) == 0
    assert not list(journal.iterdir())


def test_local_store_staged_upload_of_a_crashed_writer_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for journal in (mine, theirs):
        _die_mid_upload(root.as_uri(), journal)
    staging = root / STAGING_DIR
    assert len(list(staging.glob("*.part"))) == 2
    assert LocalStore(root).own_uploads(mine) == 1
    assert len(list(staging.glob("*.part"))) == 1  # theirs stays
    assert not (root / "blobs" / "half").exists()


def test_local_store_sweep_touches_only_its_staged_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    outside = tmp_path / "escape.part"
    outside.write_text("keep")
    (root / STAGING_DIR / "put-x").write_text("not a .part of ours")
    store.own_uploads(tmp_path / "j")
    assert outside.read_text() == "keep"
    assert (root / STAGING_DIR / "put-x").exists()
