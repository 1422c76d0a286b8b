"""Compile the guest agent (agent.c) into a static binary for the initramfs."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

from forkyard._fs import atomic_write_bytes, commit_file
from forkyard._proc import run

__all__ = ["agent_source", "build_agent"]


def agent_source() -> bytes:
    return resources.files("forkyard.guest").joinpath("agent.c").read_bytes()


def build_agent(cache_dir: Path) -> Path:
    """Static agent binary, cached by the hash of its source and the compiler."""
    src = agent_source()
    cc = run(["gcc", "--version"], timeout=30).text.splitlines()[0]
    key = hashlib.sha256(src + cc.encode()).hexdigest()[:16]
    out = cache_dir / "agent" / f"forkyard-agent-{key}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    c_file = out.parent / f"agent-{key}.c"
    atomic_write_bytes(c_file, src, mode=0o644)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # -ffile-prefix-map keeps the build path out of the binary (reproducible)
    run(
        [
            "gcc", "-static", "-O2", "-s", "-Wall", "-Wextra",
            f"-ffile-prefix-map={out.parent}=.", "-o", tmp, c_file,
        ],
        timeout=300,
        what="compile guest agent",
    )
    # `out` existing is what says "built": it must never be a half-written binary
    commit_file(tmp, out, mode=0o755)
    return out
