"""Spawned processes on a real guest: live output, exit codes, stdin, list, kill, PTYs, users."""

from __future__ import annotations

import time

import pytest

from forkyard.errors import GuestError

pytestmark = pytest.mark.vm


def _drain(procs, pid, o=0, e=0, *, wait=5.0, deadline=30.0):  # type: ignore[no-untyped-def]
    """Everything a process prints from offsets o/e on, as (stdout, stderr, last chunk)."""
    out, err = b"", b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        c = procs.read(pid, o, e, wait=wait)
        out, err, o, e = out + c.stdout, err + c.stderr, c.out_next, c.err_next
        if c.exited:
            return out, err, c
    raise AssertionError("process did not end")


def test_live_output_arrives_before_the_end(shared_sandbox):
    procs = shared_sandbox.procs
    t0 = time.monotonic()
    pid = procs.spawn("for i in 1 2 3; do echo line$i; sleep 1; done", lossless=True)
    c = procs.read(pid, 0, 0, wait=10)
    assert c.stdout.startswith(b"line1") and not c.exited
    assert time.monotonic() - t0 < 2.5  # the command runs ~3 s
    out, _, last = _drain(procs, pid, c.out_next, deadline=20)
    assert (c.stdout + out) == b"line1\nline2\nline3\n" and last.exit_code == 0


def test_exit_codes_signals_and_stdin(shared_sandbox):
    procs = shared_sandbox.procs
    pid = procs.spawn("echo o; echo e >&2; exit 7", lossless=True)
    out, err, last = _drain(procs, pid)
    assert (out, err, last.exit_code, last.signal) == (b"o\n", b"e\n", 7, None)
    pid = procs.spawn(["sleep", "30"])
    procs.kill(pid, 9)
    _, _, last = _drain(procs, pid)
    assert (last.exit_code, last.signal) == (128 + 9, 9)
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    pid = procs.spawn(["cat"], keep_stdin=True, lossless=True)
    for i in range(0, len(data), 256 * 1024):
        while True:
            try:
                procs.write(pid, data[i:i + 256 * 1024])
                break
            except GuestError as exc:
                assert exc.kind == "busy"
                time.sleep(0.05)
    procs.write(pid, b"", eof=True)
    out, _, last = _drain(procs, pid, deadline=60)
    assert out == data and last.exit_code == 0


def test_background_list_attach_kill(shared_sandbox):
    procs = shared_sandbox.procs
    pid = procs.spawn("i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.3; done")
    time.sleep(1)
    listed = {p.pid: p for p in procs.list()}
    assert listed[pid].running and "tick" in listed[pid].command
    first = procs.read(pid, 0, 0, wait=5)
    later = procs.read(pid, first.out_next, 0, wait=5)  # attach: only new output
    assert later.out_offset == first.out_next and later.stdout.startswith(b"tick")
    procs.kill(pid, 15)
    _, _, last = _drain(procs, pid)
    assert last.signal == 15 and last.exit_code == 128 + 15
    assert not {p.pid: p for p in procs.list()}[pid].running


def test_a_reader_that_stops_blocks_only_its_process(shared_sandbox):
    """A lossless flood nobody reads: the guest stops reading it, other calls go on."""
    sb = shared_sandbox
    floods: list[int] = []
    try:
        pid = sb.procs.spawn("cat /dev/zero", lossless=True)
        floods.append(pid)
        time.sleep(1)
        assert sb.exec("echo fine").stdout == "fine\n"
        c = sb.procs.read(pid, 0, 0, max_bytes=1 << 30)
        assert len(c.stdout) <= 1 << 20  # bounded per read, whatever the guest holds
        # a lossy flood keeps only its scrollback: the start offset runs ahead
        lossy = sb.procs.spawn("cat /dev/zero")
        floods.append(lossy)
        # once it printed more than its scrollback, a read from 0 starts later (a
        # slow TCG guest under load may need a few seconds to print that much)
        deadline = time.monotonic() + 30
        while sb.procs.read(lossy, 0, 0).out_offset == 0:
            assert time.monotonic() < deadline, "the lossy flood never ran past its scrollback"
            time.sleep(0.5)
    finally:
        # a flood left running would starve every later test of the shared guest
        for p in floods:
            sb.procs.kill(p, 9)


def test_the_agent_answers_under_floods_and_cpu_hogs(shared_sandbox):
    """Hostile load in the guest (writers as fast as the agent reads, busy loops):
    host calls are still answered, and the agent outranks what it runs."""
    sb = shared_sandbox
    hogs: list[int] = []
    try:
        hogs += [sb.procs.spawn("cat /dev/zero") for _ in range(2)]
        hogs.append(sb.procs.spawn("cat /dev/zero >&2", lossless=True))
        hogs += [sb.procs.spawn("while :; do :; done") for _ in range(2)]
        time.sleep(2)
        for i in range(5):
            assert sb.exec(f"echo {i}", timeout=20).stdout == f"{i}\n"
        assert sb.exec("cut -d' ' -f19 /proc/1/stat").stdout.strip() == "-10"
        assert sb.exec("cut -d' ' -f19 /proc/self/stat").stdout.strip() == "0"
    finally:
        for p in hogs:
            sb.procs.kill(p, 9)


def test_pty_tty_size_resize_exit(shared_sandbox):
    procs = shared_sandbox.procs
    pid = procs.spawn(None, pty=True, rows=30, cols=100, keep_stdin=True)
    o = 0
    screen = b""

    def until(marker: bytes) -> bytes:
        nonlocal o, screen
        end = time.monotonic() + 20
        while marker not in screen and time.monotonic() < end:
            c = procs.read(pid, o, 0, wait=2)
            screen += c.stdout
            o = c.out_next
        assert marker in screen, screen[-500:]
        return screen

    procs.write(pid, b"tty; echo M$((0+1))\n")
    assert b"/dev/pts/" in until(b"M1\r\n")
    procs.write(pid, b"stty size; echo M$((0+2))\n")
    assert b"30 100" in until(b"M2\r\n")
    procs.resize(pid, 40, 120)
    procs.write(pid, b"stty size; echo M$((0+3))\n")
    assert b"40 120" in until(b"M3\r\n")
    procs.write(pid, b"exit 3\n")
    end = time.monotonic() + 20
    while time.monotonic() < end:
        c = procs.read(pid, o, 0, wait=2)
        o = c.out_next
        if c.exited:
            assert c.exit_code == 3
            break
    else:
        raise AssertionError("the shell did not exit")


def test_user_runs_commands_as_that_account(shared_sandbox):
    sb = shared_sandbox
    r = sb.exec("id -u; echo $HOME; pwd", user="user")
    uid, home, cwd = r.stdout.split()
    assert uid != "0" and home == "/home/user" and cwd == "/home/user"
    assert sb.exec("id -u").stdout == "0\n"  # root stays the default
    with pytest.raises(GuestError) as e:
        sb.exec("true", user="nobody-here")
    assert e.value.kind == "not_found"
