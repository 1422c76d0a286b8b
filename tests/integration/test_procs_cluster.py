"""Live commands, processes and terminals through a real cluster (SDK and CLI)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forkyard.sdk import Sandbox
from tests.fixtures.cli import FORKYARD, fy, readme_example, up_cluster

pytestmark = pytest.mark.vm

TICKS = "for i in 1 2 3; do echo tick$i; sleep 1; done"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("procs-cluster") / "home"
    with up_cluster(root):
        yield root


@pytest.fixture(scope="module")
def sb(home: Path) -> Iterator[Sandbox]:
    os.environ["FORKYARD_HOME"] = str(home)
    try:
        with Sandbox.create() as s:
            yield s
    finally:
        os.environ.pop("FORKYARD_HOME", None)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN")}
    env["FORKYARD_HOME"] = str(home)
    return env


def test_sdk_callbacks_get_output_while_the_command_runs(sb):
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    r = sb.exec(TICKS, on_stdout=lambda s: seen.append((time.monotonic() - t0, s)))
    took = time.monotonic() - t0
    assert r.exit_code == 0 and r.stdout == "tick1\ntick2\ntick3\n"
    assert "".join(s for _, s in seen) == r.stdout
    assert seen[0][0] < took - 1.5  # the first line came ~2 s before the end
    # iterator form, and the exit codes of the buffered and live forms agree
    h = sb.commands.start("echo a; echo b >&2; exit 5")
    events = list(h)
    assert ("stdout", b"a\n") in events and ("stderr", b"b\n") in events
    assert h.exit_code == 5
    assert sb.exec("kill -9 $$", on_stdout=print).exit_code == 137


def test_cli_exec_prints_live_and_exits_with_the_guest_code(home, sb):
    t0 = time.monotonic()
    p = subprocess.Popen([FORKYARD, "exec", sb.id, "--", TICKS], stdout=subprocess.PIPE,
                         env=_env(home))
    assert p.stdout is not None
    first = p.stdout.readline()
    first_at = time.monotonic() - t0
    rest = p.stdout.read()
    assert p.wait(60) == 0
    took = time.monotonic() - t0
    assert first == b"tick1\n" and rest == b"tick2\ntick3\n"
    assert first_at < took - 1.5, (first_at, took)
    assert fy("exec", sb.id, "--", "exit 7", home=home, check=False).returncode == 7
    assert fy("exec", sb.id, "--", "kill -TERM $$", home=home, check=False).returncode == 143


def test_cli_exec_forwards_stdin_byte_for_byte(home, sb):
    data = os.urandom(3 * 1024 * 1024 + 17)
    r = fy("exec", "-i", sb.id, "--", "cat", home=home, input=data)
    assert r.stdout == data
    r = fy("exec", "--stdin", sb.id, "--", "wc -c", home=home, input=data)
    assert r.stdout.strip() == str(len(data)).encode()


def test_background_process_ps_attach_kill_wait(home, sb):
    pid = int(fy("exec", "-d", sb.id, "--",
                 "i=0; while true; do echo n$i; i=$((i+1)); sleep 0.5; done",
                 home=home).stdout)
    listed = json.loads(fy("ps", "--json", sb.id, home=home).stdout)
    assert any(p["pid"] == pid and p["running"] for p in listed)
    assert str(pid) in fy("ps", sb.id, home=home).stdout.decode()
    att = subprocess.Popen([FORKYARD, "attach", sb.id, str(pid)], stdout=subprocess.PIPE,
                           env=_env(home))
    assert att.stdout is not None
    line = att.stdout.readline()
    assert line.startswith(b"n") and line != b"n0\n"  # new output, not the scrollback
    h = sb.commands.connect(pid)
    fy("kill", sb.id, str(pid), "-s", "TERM", home=home)
    assert h.wait().exit_code == 143  # SDK wait returns its code
    assert att.wait(60) == 143  # attach exits with the process's status
    assert not next(p for p in sb.commands.list() if p.pid == pid).running


def test_sdk_pty_and_user(sb):
    t = sb.pty.create(rows=20, cols=70)
    screen = b""

    def until(marker: bytes) -> bytes:
        nonlocal screen
        screen = b""
        end = time.monotonic() + 30
        while marker not in screen and time.monotonic() < end:
            screen += b"".join(d for _, d in t.read(wait=2))
        assert marker in screen, screen
        return screen

    t.send_stdin("tty; stty size; echo E$((1+1))\n")
    out = until(b"E2\r\n")
    assert b"/dev/pts/" in out and b"20 70" in out
    t.resize(33, 99)
    t.send_stdin("stty size; echo E$((1+2))\n")
    assert b"33 99" in until(b"E3\r\n")
    t.send_stdin("exit 3\n")
    assert t.wait().exit_code == 3
    assert sb.exec("id -un; echo $HOME", user="user").stdout == "user\n/home/user\n"
    assert sb.commands.run("id -u", user="user").stdout.strip() != "0"


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_cli_shell_under_a_pseudo_terminal(home, sb):
    master, slave = pty.openpty()
    _set_size(slave, 25, 90)
    p = subprocess.Popen([FORKYARD, "shell", sb.id], stdin=slave, stdout=slave, stderr=slave,
                         env=_env(home), start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    buf = b""

    def until(marker: bytes, timeout: float = 60) -> bytes:
        nonlocal buf
        end = time.monotonic() + timeout
        while marker not in buf and time.monotonic() < end:
            if select.select([master], [], [], 1)[0]:
                try:
                    buf += os.read(master, 65536)
                except OSError:
                    break
        assert marker in buf, buf[-800:]
        got, buf = buf, b""
        return got

    def at_prompt(seen: bytes = b"") -> None:
        """Wait for the prompt (typing before the CLI made the terminal raw would echo
        locally) and answer the line editor's cursor query, as a terminal does."""
        nonlocal buf
        if b"# " not in seen:
            seen += until(b"# ")
        end = time.monotonic() + 3
        while b"\x1b[6n" not in seen and time.monotonic() < end:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 65536)
        if b"\x1b[6n" in seen:
            os.write(master, b"\x1b[1;5R")
            time.sleep(0.5)  # read apart from what is typed next (ash drops a mixed read)
        buf = b""

    at_prompt()
    os.write(master, b"tty; stty size; echo S$((2+2))\n")
    out = until(b"S4")
    assert b"/dev/pts/" in out and b"25 90" in out
    _set_size(master, 40, 132)  # the kernel sends SIGWINCH to the forkyard CLI
    time.sleep(1)
    at_prompt(out.split(b"S4")[-1])
    os.write(master, b"stty size; echo S$((2+3))\n")
    out = until(b"S5")
    assert b"40 132" in out
    at_prompt(out.split(b"S5")[-1])
    os.write(master, b"exit 3\n")
    assert p.wait(60) == 3
    os.close(master)
    # `exec -t`: one command on a terminal
    r = fy("exec", "-t", sb.id, "--", "tty; exit 4", home=home, check=False)
    assert r.returncode == 4 and b"/dev/pts/" in r.stdout


def test_a_client_that_stops_reading_a_flood_grows_no_memory(home, sb):
    """Hostile output and a reader that stalls: control-plane RSS stays put, others go on."""
    cfg = json.loads((home / "cluster.json").read_text())  # this test's own cluster
    cp_pid, url, token = cfg["pids"]["server"], cfg["url"], cfg["api_token"]
    h = sb.commands.start("cat /dev/zero", lossless=True)

    def rss(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as c, \
            c.stream("GET", f"/v1/sandboxes/{sb.id}/procs/{h.pid}/stream") as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = json.loads(next(lines))
        assert first["pid"] == h.pid and not first["exited"]
        before = rss(cp_pid)
        time.sleep(4)  # not reading: the guest keeps producing
        assert sb.exec("echo still").stdout == "still\n"
        assert rss(cp_pid) - before < 32 * 1024 * 1024
        next(lines)  # and the stream is still usable
    h.kill(9)
    assert h.wait().signal == 9


def _vm_hwm_sampler(pids: list[int]) -> tuple[threading.Event, dict[int, int]]:
    """Peak RSS of each process while the sampler runs (stop it with the event)."""
    peak = {p: _rss(p) for p in pids}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            for p in pids:
                peak[p] = max(peak[p], _rss(p))

    threading.Thread(target=sample, daemon=True).start()
    return stop, peak


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_200_mb_of_stdout_through_the_control_plane_is_bounded(home, sb):
    """A buffered exec printing 200 MB: cut at max_output; the control plane's and the
    worker's memory grow by about the limit, not with what the guest printed."""
    cfg = json.loads((home / "cluster.json").read_text())
    pids = list(cfg["pids"].values())
    sb.exec("true")
    base = {p: _rss(p) for p in pids}
    stop, peak = _vm_hwm_sampler(pids)
    try:
        r = sb.exec("dd if=/dev/zero bs=1M count=200 2>/dev/null; echo done >&2", timeout=300)
    finally:
        stop.set()
    assert r.exit_code == 0 and r.stderr == "done\n"
    assert 0 < len(r.stdout) <= 16 * 1024 * 1024
    limit = 2 * 16 * 1024 * 1024 + 64 * 1024  # the exec reply limit at the default max_output
    grew = {name: peak[pid] - base[pid] for name, pid in cfg["pids"].items()}
    # base64 on the wire is 4/3 of the bytes, and each hop holds the reply and its
    # encoding while one becomes the other; glibc's per-thread arenas add slack
    assert all(g < 3 * limit for g in grew.values()), grew


def test_async_twin_streams_too(sb):
    from forkyard.sdk import AsyncSandbox

    async def main() -> tuple[list[float], float, int | None, list[tuple[str, bytes]]]:
        asb = await AsyncSandbox.connect(sb.id)
        seen: list[float] = []
        t0 = time.monotonic()
        r = await asb.exec(TICKS, on_stdout=lambda _s: seen.append(time.monotonic() - t0))
        took = time.monotonic() - t0
        h = await asb.commands.start("echo x; exit 9")
        events = [ev async for ev in h]
        return seen, took, r.exit_code if r.stdout == "tick1\ntick2\ntick3\n" else None, \
            [*events, ("code", str(h.exit_code).encode())]

    seen, took, code, events = asyncio.run(main())
    assert code == 0 and seen[0] < took - 1.5
    assert ("stdout", b"x\n") in events and events[-1] == ("code", b"9")


def test_the_readme_live_examples_run(home, tmp_path):
    env = _env(home)
    env["PATH"] = f"{Path(FORKYARD).parent}:{env.get('PATH', '')}"
    cli = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example("live")],
                         cwd=tmp_path, env=env, capture_output=True, timeout=600, check=False)
    out = cli.stdout.decode(errors="replace")
    assert cli.returncode == 0, out + cli.stderr.decode(errors="replace")
    assert "step 1\nstep 2\nstep 3\n100000\n" in out
    assert "tick\n" in out and "ended with 143" in out
    assert "user" in out and "shell exited 3" in out
    sdk = subprocess.run([sys.executable, "-c", readme_example("sdk-live")], env=env,
                         capture_output=True, timeout=600, check=False)
    lines = sdk.stdout.decode().splitlines()
    assert sdk.returncode == 0, sdk.stdout.decode() + sdk.stderr.decode()
    assert lines[:2] == ["step 1", "step 2"] and "while true" in lines[2]
    assert lines[3] == "143" and lines[-1] == "3"
