"""Where the control plane is and how to authenticate, resolved in one place.

Each setting is taken from, in order:

1. the argument (``Sandbox.create(url=..., token=...)``, ``--url/--token``);
2. the environment: ``FORKYARD_URL``, ``FORKYARD_API_TOKEN``, ``FORKYARD_CA``;
3. the running cluster recorded in ``<home>/cluster.json`` by ``forkyard up``,
   where ``home`` is the argument, else ``$FORKYARD_HOME``, else ``~/.forkyard``.

The cluster file's token is only used for the cluster file's own URL: a URL
given explicitly names some other server, and the local cluster's secret must
not be sent to it.

The token is an API key (``forkyard keys create``); the one ``forkyard up``
stores is the cluster's first admin key.  ``ca`` (or ``$FORKYARD_CA``) is the
PEM bundle an ``https://`` control plane's certificate is checked against
(a private CA or a self-signed certificate); without it, the system's.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from forkyard.config import default_home
from forkyard.sdk.cluster import cluster_path, load_cluster
from forkyard.sdk.errors import ConfigurationError

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "ENV_CA", "ENV_TOKEN", "ENV_URL", "ConnectionConfig",
           "Transport", "resolve_home"]

ENV_URL = "FORKYARD_URL"
ENV_TOKEN = "FORKYARD_API_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_CA = "FORKYARD_CA"
DEFAULT_REQUEST_TIMEOUT = 60.0

Transport = httpx.BaseTransport | httpx.AsyncBaseTransport


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    return Path(home).expanduser().absolute() if home is not None else default_home().absolute()


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """A resolved connection: base URL, bearer token, default request timeout.

    ``transport`` replaces httpx's network transport (tests use
    ``httpx.MockTransport``, which serves both the sync and the async client;
    a transport of only one kind works only with that kind of client).
    """

    url: str
    token: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    source: str = "argument"  # where the URL came from, for error messages
    transport: Transport | None = field(default=None, compare=False, repr=False)
    ca: str | None = None  # PEM bundle to check the server's certificate; None: system's

    def __post_init__(self) -> None:
        # several control planes (comma-separated): see ``urls``
        urls = [u.strip().rstrip("/") for u in self.url.split(",")]
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigurationError(
                    f"forkyard URL must start with http:// or https://, got {u!r} "
                    f"(from {self.source})"
                )
        object.__setattr__(self, "url", ",".join(urls))

    @property
    def urls(self) -> tuple[str, ...]:
        """Every control plane's URL, in order: a request goes to the next one when a
        control plane cannot be reached or stands by (another one is active)."""
        return tuple(self.url.split(","))

    @classmethod
    def resolve(
        cls,
        *,
        url: str | None = None,
        token: str | None = None,
        home: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
        transport: Transport | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> ConnectionConfig:
        source = "argument"
        if ca is None and os.environ.get(ENV_CA):
            ca = os.environ[ENV_CA]
        if url is None and os.environ.get(ENV_URL):
            url, source = os.environ[ENV_URL], f"${ENV_URL}"
        if token is None and os.environ.get(ENV_TOKEN):
            token = os.environ[ENV_TOKEN]
        if url is None or token is None:
            root = resolve_home(home)
            cluster = load_cluster(root)
            if url is None:
                if cluster is None:
                    raise ConfigurationError(
                        "no forkyard control plane configured: pass url=/--url, set "
                        f"${ENV_URL}, or start a cluster with `forkyard up` (no "
                        f"{cluster_path(root)})"
                    )
                if cluster.url is None:
                    raise ConfigurationError(
                        f"the cluster in {root} is still starting (or its start failed; "
                        "see `forkyard status`)"
                    )
                url, source = cluster.url, str(cluster.path)
            if token is None and cluster is not None and cluster.url is not None \
                    and cluster.url.rstrip("/") == url.rstrip("/"):
                token = cluster.api_token
        return cls(
            url=url,
            token=token,
            request_timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT,
            source=source,
            transport=transport,
            ca=os.fspath(ca) if ca is not None else None,
        )

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify`` for this connection (a bad bundle: ConfigurationError)."""
        if self.ca is None:
            return True
        try:
            return ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot use CA bundle {self.ca!r}: {exc}") from exc

    @property
    def headers(self) -> dict[str, str]:
        from forkyard import __version__

        h = {"User-Agent": f"forkyard-sdk/{__version__}"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h
