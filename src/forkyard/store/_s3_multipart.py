"""Multipart uploads of :class:`~forkyard.store.s3.S3Store`, and their journal.

An upload's id is noted in the worker's home before its first part, so the
next start of a process that was killed mid-upload aborts it (its parts would
otherwise be billed forever); see ``own_uploads``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from forkyard._fs import atomic_write_bytes
from forkyard.store._base import ProgressFn, Readable
from forkyard.store._s3_client import S3_ERRORS
from forkyard.store._s3_parts import chunks, upload_parts

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["MultipartUploads"]

log = logging.getLogger("forkyard.store.s3")


class MultipartUploads(ABC):
    """The multipart side of an S3 store; the attributes are the store's."""

    _client: S3Client
    _bucket: str
    _concurrency: int
    _journal: Path | None

    @property
    @abstractmethod
    def url(self) -> str:
        ...

    @abstractmethod
    def _boundary(self, op: str, key: str) -> AbstractContextManager[None]:
        ...

    @abstractmethod
    def _write_once(self, key: str, op: str, send: Callable[[bool], None],
                    if_absent: bool) -> bool:
        ...

    def _put_multipart(
        self,
        key: str,
        full: str,
        head: deque[bytes],
        src: Readable,
        part_size: int,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        with self._boundary("CreateMultipartUpload", key):
            upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=full)[
                "UploadId"
            ]
        note = self._note_upload(full, upload_id)
        try:
            parts = upload_parts(
                lambda number, data: self._upload_part(full, upload_id, number, data),
                chunks(head, src, part_size),
                key=key,
                concurrency=self._concurrency,
                total=total,
                progress=progress,
                boundary=self._boundary,
            )

            def send(conditional: bool) -> None:
                self._complete(full, upload_id, parts, conditional)

            written = self._write_once(key, "CompleteMultipartUpload", send, if_absent)
        except BaseException:
            self._abort(full, upload_id)
            raise
        finally:
            if note is not None:
                note.unlink(missing_ok=True)
        if not written:
            self._abort(full, upload_id)  # the parts are useless now; free their space
        return written

    def own_uploads(self, journal: Path) -> int:
        """Abort the multipart uploads an earlier process noted in ``journal`` (their
        parts would be billed forever); note this process's from now on."""
        journal.mkdir(parents=True, exist_ok=True, mode=0o700)
        aborted = 0
        for note in sorted(journal.glob("*.json")):
            try:
                entry = json.loads(note.read_text())
                full, upload_id = str(entry["key"]), str(entry["upload_id"])
            except (OSError, ValueError, KeyError, TypeError):
                note.unlink(missing_ok=True)  # torn note: the upload it named is unknown
                continue
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=full,
                                                    UploadId=upload_id)
                aborted += 1
            except S3_ERRORS as exc:
                if not _no_such_upload(exc):
                    log.warning("could not abort leftover upload of %s in %s: %s", full,
                                self.url, exc)
                    continue  # tried again at the next start
            note.unlink(missing_ok=True)
        self._journal = journal
        return aborted

    def _note_upload(self, full: str, upload_id: str) -> Path | None:
        if self._journal is None:
            return None
        name = hashlib.sha256(f"{full}\0{upload_id}".encode()).hexdigest()[:32]
        note = self._journal / f"{name}.json"
        atomic_write_bytes(note, json.dumps({"key": full, "upload_id": upload_id}))
        return note

    def _upload_part(self, full: str, upload_id: str, number: int, data: bytes) -> str:
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
        )
        return resp["ETag"]

    def _complete(
        self,
        full: str,
        upload_id: str,
        parts: builtins.list[CompletedPartTypeDef],
        conditional: bool,
    ) -> None:
        if conditional:
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        else:
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload_id)
        except S3_ERRORS as exc:
            # The original failure matters more; a lifecycle rule can reap the parts.
            log.warning("could not abort multipart upload of %s in %s: %s", full, self.url, exc)


def _no_such_upload(exc: BaseException) -> bool:
    """The upload is gone already (completed, aborted, or reaped by a lifecycle rule)."""
    return isinstance(exc, ClientError) and \
        exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404")
