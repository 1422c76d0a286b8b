"""The worker's link to the control plane: register, heartbeat, leave.

It registers at start (retrying until the control plane answers), then
reports every ``interval`` seconds, or at once when kicked: a change the
control plane should see without delay.  The reply names sandboxes the
cluster no longer knows, handed to ``on_orphans``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from forkyard.wire.serving import write_ready_file
from forkyard.wire.worker_models import HeartbeatReply, WorkerLeaving, WorkerReport

__all__ = ["HEARTBEAT_INTERVAL", "ControlLink"]

log = logging.getLogger("forkyard.worker.daemon")

HEARTBEAT_INTERVAL = 2.0
_LEAVE_TIMEOUT = 10.0
_MIN_REPORT_GAP = 0.2


class ControlLink:
    """One background thread reporting to ``server_url``; inert when it is ``None``."""

    def __init__(
        self,
        *,
        name: str,
        token: str,
        server_url: str | None,
        public_url: str | None,
        interval: float,
        ready_file: Path | None,
        report: Callable[[], WorkerReport],
        on_orphans: Callable[[list[str]], None],
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.name = name
        self.token = token  # this worker's own credential, bound to its name
        self.verify = verify  # how the control plane's TLS certificate is checked
        # several control planes (comma-separated): the one that answers is used
        # until it stops answering or says it stands by; then the next one
        self.server_urls = [u.strip().rstrip("/") for u in (server_url or "").split(",")
                            if u.strip()]
        self._current = 0
        self.public_url = public_url
        self.interval = interval
        self.ready_file = ready_file
        self._report = report
        self._on_orphans = on_orphans
        self._stop = threading.Event()
        self._kick = threading.Event()  # report now instead of at the next tick
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()

    def kick(self) -> None:
        """Send a report now: the control plane should see this change without delay."""
        self._kick.set()

    @property
    def server_url(self) -> str | None:
        """The control plane reported to now (None: this worker has none)."""
        return self.server_urls[self._current] if self.server_urls else None

    def _next_server(self) -> None:
        self._current = (self._current + 1) % max(1, len(self.server_urls))

    def start(self) -> None:
        if self.server_url is None or self.public_url is None:
            return
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=15.0)

    def _post(self, http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
        return http.post(path, json=body, timeout=httpx.Timeout(10.0, connect=3.0))

    def _loop(self) -> None:
        assert self.server_url is not None
        headers = {"authorization": f"Bearer {self.token}"}
        backoff = 0.2
        registered = False
        complained = 0.0
        with httpx.Client(headers=headers, verify=self.verify) as http:
            while not self._stop.is_set():
                path = ("/internal/workers/register" if not registered
                        else f"/internal/workers/{self.name}/heartbeat")
                self._kick.clear()  # before the report: a change made during it kicks again
                url = f"{self.server_url}{path}"
                try:
                    try:
                        resp = self._post(http, url, self._report().model_dump(mode="json"))
                    except httpx.TransportError:
                        self._next_server()  # down: the next control plane may be active
                        raise
                    if _standby(resp):
                        self._next_server()
                        raise RuntimeError(f"{url} stands by")
                    if resp.status_code == 404 and registered:
                        registered = False  # the control plane forgot us: start over
                        continue
                    if resp.status_code >= 400:
                        raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
                    reply = HeartbeatReply.model_validate(resp.json())
                    if not registered:
                        registered = True
                        log.info("registered with %s as %s", self.server_url, self.name)
                        self._on_registered()
                    backoff = 0.2
                    self._on_orphans(reply.destroy)
                    wait = self.interval
                except Exception as exc:
                    now = time.monotonic()
                    if now - complained > 10.0:  # a down server is not worth a log flood
                        log.warning("%s %s failed: %s", "heartbeat" if registered
                                    else "registration", url, exc)
                        complained = now
                    wait = backoff
                    # with several control planes, trying the next one costs nothing
                    backoff = min(backoff * 2, self.interval / max(1, len(self.server_urls)))
                sent = time.monotonic()
                self._kick.wait(wait)
                # a burst of changes (fork count=32) makes one report, not 32
                self._stop.wait(max(0.0, _MIN_REPORT_GAP - (time.monotonic() - sent)))

    def _on_registered(self) -> None:
        if self.ready_file is not None and not self.registered.is_set():
            write_ready_file(self.ready_file, {"url": self.public_url, "name": self.name})
        self.registered.set()

    def leave(self, body: WorkerLeaving) -> None:
        """Tell the control plane what became of our sandboxes (if it ever knew us)."""
        if self.server_url is None or not self.registered.is_set():
            return
        error: Exception | None = None
        for _ in self.server_urls:  # the active one first, then the others
            try:
                resp = httpx.post(f"{self.server_url}/internal/workers/{self.name}/leave",
                                  json=body.model_dump(mode="json"), timeout=_LEAVE_TIMEOUT,
                                  verify=self.verify,
                                  headers={"authorization": f"Bearer {self.token}"})
                if not _standby(resp):
                    resp.raise_for_status()
                    return
                error = RuntimeError(f"{self.server_url} stands by")
            except httpx.HTTPError as exc:
                error = exc
            self._next_server()
        log.warning("could not tell the control plane we are leaving: %s", error)


def _standby(resp: httpx.Response) -> bool:
    """A control plane that stands by: another one is active (``control._leader``)."""
    if resp.status_code != 503:
        return False
    try:
        return bool(resp.json()["error"]["type"] == "standby")
    except (ValueError, KeyError, TypeError):
        return False
