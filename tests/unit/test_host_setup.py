"""``forkyard setup`` lets confined QEMUs use userfaultfd (live checkpoints need it)."""

from __future__ import annotations

from pathlib import Path

from forkyard.host.setup import ensure_userfaultfd


def test_userfaultfd_is_allowed_now_and_after_a_reboot(tmp_path: Path) -> None:
    proc, conf = tmp_path / "unprivileged_userfaultfd", tmp_path / "60-forkyard.conf"
    proc.write_text("0\n")
    said: list[str] = []
    assert ensure_userfaultfd(said.append, proc=proc, conf=conf)
    assert proc.read_text() == "1\n"
    assert "vm.unprivileged_userfaultfd = 1" in conf.read_text()
    assert said and "allowed" in said[0]
    said.clear()
    assert ensure_userfaultfd(said.append, proc=proc, conf=conf) and said == []  # idempotent


def test_a_host_that_refuses_says_checkpoints_will_pause(tmp_path: Path) -> None:
    proc = tmp_path / "unprivileged_userfaultfd"
    proc.write_text("0\n")
    proc.chmod(0o444)
    said: list[str] = []
    import os

    if os.geteuid() == 0:  # root writes a 0444 file: a missing one refuses the same way
        proc = tmp_path / "no-such-dir" / "unprivileged_userfaultfd"
    assert not ensure_userfaultfd(said.append, proc=proc, conf=tmp_path / "conf")
    assert "pause" in said[0] and not (tmp_path / "conf").exists()


def test_an_operators_no_in_the_conf_file_is_kept(tmp_path: Path) -> None:
    proc, conf = tmp_path / "unprivileged_userfaultfd", tmp_path / "60-forkyard.conf"
    proc.write_text("0\n")
    conf.write_text("# mine\nvm.unprivileged_userfaultfd = 0\n")
    said: list[str] = []
    assert not ensure_userfaultfd(said.append, proc=proc, conf=conf)
    assert proc.read_text() == "0\n" and "= 0" in conf.read_text()
    assert "root-only" in said[0]


def test_after_a_reboot_that_lost_the_setting_it_is_set_again(tmp_path: Path) -> None:
    proc, conf = tmp_path / "unprivileged_userfaultfd", tmp_path / "60-forkyard.conf"
    conf.write_text("vm.unprivileged_userfaultfd = 1\n")
    proc.write_text("0\n")
    assert ensure_userfaultfd(lambda _m: None, proc=proc, conf=conf)
    assert proc.read_text() == "1\n"
