"""The exec launcher between the worker and a confined QEMU (stdlib only, run as a script).

``python -I -S _jailer.py SPEC -- qemu-system-x86_64 ...`` runs as root in
the child the worker's spawner thread forked, sets up everything QEMU must not
be able to change, then execs QEMU in place (same pid).  The order is the
Firecracker jailer's, because QEMU 7.2's own ``-runas``/``-chroot`` die under
``-sandbox`` (SIGSYS; see jail.py):

1. parent-death signal, then check the parent is still the worker;
2. join the VM's cgroups (the worker created them with their limits);
3. new mount, network, IPC and UTS namespaces; every mount made private;
4. a fresh tmpfs as the new root holding only read-only binds of /usr and the
   few files QEMU opens by path, plus /dev/{null,zero,full,random,urandom}
   (and /dev/kvm for KVM guests) and a pid-only /proc (QEMU opens its RAM
   memfd as /proc/self/fd/N); ``pivot_root`` into it, the host's tree
   detached (everything else QEMU touches arrives as an fd);
5. rlimits (file size, open files, threads, no core dumps), SIGXFSZ ignored
   so an oversized write fails with EFBIG (a disk fault the worker reports)
   instead of killing QEMU;
6. drop to the VM's uid/gid with no supplementary groups (this clears every
   capability), ``PR_SET_NO_NEW_PRIVS``;
7. the parent-death signal again: the kernel clears it on a credential
   change, and the VM must still die with its worker;
8. exec QEMU with the scrubbed environment; QEMU then adds its seccomp filter.

Any failure prints one line to stderr (the VM's qemu.log) and exits 125.
This file must import nothing from forkyard: it runs with ``-I -S``.  SPEC is
a hex-encoded ``marshal`` dict (same interpreter on both sides): unlike json,
marshal costs no import, and every VM start pays this file's startup.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import signal
import stat
import sys

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = 155  # x86_64
EXIT_JAIL = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src} on {dst}")


def _bind(src: str, dst: str, *, writable: bool) -> None:
    """Bind ``src`` at ``dst`` inside the new root, read-only unless ``writable``."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600))
    _mount(src, dst, None, _MS_BIND | _MS_REC, None)
    flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID
    if not writable:
        flags |= _MS_RDONLY
    if not stat.S_ISCHR(os.stat(src).st_mode):
        flags |= _MS_NODEV
    _mount(None, dst, None, flags, None)


def _copy_in(src: str, dst: str, uid: int, gid: int) -> None:
    """A boot file the VM's uid may not read on the host: a private copy it alone can read."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    os.chown(dst, uid, gid)
    os.chmod(dst, 0o400)


def _readable_by_others(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _set_pdeathsig(ppid: int) -> None:
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != ppid:  # the worker died before the signal was armed
        os._exit(EXIT_JAIL)


def _build_root(spec: dict[str, object]) -> None:
    root = str(spec["root"])
    uid, gid = int(spec["uid"]), int(spec["gid"])  # type: ignore[call-overload]
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE, None)
    kib = int(spec["tmpfs_kib"])  # type: ignore[call-overload]
    _mount("forkyard-jail", root, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={kib}k,nr_inodes=4096,mode=0755")
    for src in ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin"):
        if os.path.islink(src):
            os.symlink(os.readlink(src), root + src)
        elif os.path.isdir(src):
            _bind(src, root + src, writable=False)
    for src in ("/etc/ld.so.cache",):
        if os.path.exists(src):
            _bind(src, root + src, writable=False)
    os.makedirs(root + "/dev", mode=0o755)
    for dev in spec["devices"]:  # type: ignore[attr-defined]
        _bind(dev, root + dev, writable=True)
    # /proc, for one path only: QEMU 7.2 opens the guest RAM's memory-backend-file by
    # path, and that file is a memfd it inherited (vm/ram.py): /proc/self/fd/N.  Pid
    # directories only (no /proc/sys, kcore, ...), other users' processes hidden.
    os.makedirs(root + "/proc", mode=0o555)
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
           "subset=pid,hidepid=invisible")
    for src in spec["files"]:  # type: ignore[attr-defined]
        if _readable_by_others(src):
            _bind(src, root + src, writable=False)
        else:
            _copy_in(src, root + src, uid, gid)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it
    # leaves no path back to the host's tree (unlike a chroot)
    os.chdir(root)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the old root")
    os.chdir("/")
    _mount(None, "/", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: _jailer.py SPEC -- PROGRAM ARGS...")
    spec = marshal.loads(bytes.fromhex(argv[1]))  # noqa: S302 - written by the worker, root only
    qemu = argv[3:]
    ppid = int(spec["ppid"])
    _set_pdeathsig(ppid)
    for procs in spec["cgroups"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS),
           "unshare")
    _build_root(spec)
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # survives exec: EFBIG, not death
    uid, gid = int(spec["uid"]), int(spec["gid"])
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _set_pdeathsig(ppid)
    os.execve(spec["exe"], qemu, spec["env"])  # noqa: S606 - argv list, absolute path


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        print(f"forkyard jail: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_JAIL)
