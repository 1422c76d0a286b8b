"""The fast path of ``forkyard.cli.main``: what it keeps out of the process, which
arguments it takes, and that it answers exactly as the typer app does."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import httpx
import pytest
from typer.testing import CliRunner

from forkyard.cli import _fast, _hot, _sandboxes, app, main
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk.config import ConnectionConfig
from tests.fixtures.fake_api import FakeAPI

runner = CliRunner()

# Modules the hot path must not import: the CLI framework, rich, and the
# server side.  (The SDK, and so httpx, is what ls/exec are for.)
FRAMEWORK = ("typer", "click", "rich", "pygments", "pydantic", "fastapi", "starlette",
             "uvicorn", "sqlalchemy")
NOT_FOR_VERSION = (*FRAMEWORK, "httpx", "httpcore", "asyncio", "forkyard.sdk",
                   "forkyard.guest", "forkyard.worker", "forkyard.control")


def _loaded(prefixes: tuple[str, ...], modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def _child(script: str, *args: str, env_home: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "FORKYARD_HOME": env_home,
           "PYTHONPATH": ":".join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def test_import_and_version_load_no_framework_sdk_or_server_module(tmp_path):
    script = """
        import json, sys
        import forkyard.cli
        def loaded():  # a None entry blocks an import, see _fast._block_httpx_cli
            return sorted(m for m, mod in sys.modules.items() if mod is not None)
        after_import = loaded()
        sys.argv = ["forkyard", "--version"]
        try:
            forkyard.cli.main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        print(json.dumps([after_import, loaded()]))
    """
    proc = _child(script, env_home=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out, _, modules = proc.stdout.partition("\n")
    assert out.startswith("forkyard 0.")
    after_import, after_version = json.loads(modules)
    assert "forkyard.cli" in after_import
    assert _loaded(NOT_FOR_VERSION, after_import) == []
    assert _loaded(NOT_FOR_VERSION, after_version) == []


@pytest.mark.parametrize("argv", [
    ["ls", "--url", "http://127.0.0.1:9", "--token", "t"],
    ["exec", "--url", "http://127.0.0.1:9", "--token", "t", "sb-x", "--", "true"],
    ["exec", "sb-x", "-e", "A=1", "--timeout", "5", "--json", "echo", "hi"],
])
def test_ls_and_exec_reach_the_network_without_typer_or_rich(tmp_path, argv):
    # The snapshot is taken at the first socket connect, i.e. before any network wait.
    script = """
        import json, socket, sys
        seen = []
        plain_connect = socket.socket.connect
        def connect(self, address):
            if not seen:
                seen.append(sorted(m for m, mod in sys.modules.items() if mod is not None))
            return plain_connect(self, address)
        socket.socket.connect = connect
        sys.argv = ["forkyard", *sys.argv[1:]]
        from forkyard.cli import main
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        print(json.dumps([code, seen]))
    """
    proc = subprocess.run(  # FORKYARD_URL for the argv without --url
        [sys.executable, "-c", textwrap.dedent(script), *argv], capture_output=True,
        text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "FORKYARD_HOME": str(tmp_path),
             "FORKYARD_URL": "http://127.0.0.1:9", "FORKYARD_API_TOKEN": "t",
             "PYTHONPATH": ":".join(p for p in sys.path if p)})
    code, seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen, f"no connection was attempted: {proc.stderr}"
    assert _loaded(FRAMEWORK, seen[0]) == []
    assert "forkyard.sdk" in seen[0]
    assert code == 1 and proc.stderr.startswith("error: ")  # nothing listens on port 9


@pytest.mark.parametrize(("argv", "command", "options", "args"), [
    (["--version"], "version", {}, []),
    (["--debug", "--version"], "version", {}, []),
    (["--version", "exec", "--help"], "version", {}, []),  # eager, as in click
    (["ls"], "ls", {}, []),
    (["--debug", "ls", "--home=/h", "--json", "--url", "http://x", "--url", "http://y"],
     "ls", {"home": "/h", "json_": True, "url": "http://y"}, []),
    (["exec", "sb", "--", "ls", "-l"], "exec", {}, ["sb", "ls", "-l"]),
    (["exec", "-e", "A=1", "--env=B=2", "-d", "sb", "echo", "hi", "--json", "--stdin"], "exec",
     {"env": ["A=1", "B=2"], "background": True, "json_": True, "stdin": True},
     ["sb", "echo", "hi"]),
    (["exec", "--timeout", "0", "--cwd", "/tmp", "sb", "true"], "exec",
     {"timeout": 0.0, "cwd": "/tmp"}, ["sb", "true"]),
])
def test_plain_forms_take_the_fast_path(monkeypatch, argv, command, options, args):
    monkeypatch.delenv("FORKYARD_HOME", raising=False)
    p = _fast.plan(argv)
    assert p is not None
    assert (p.command, p.options, p.args) == (command, options, args)
    assert p.debug == (argv[0] == "--debug" and command != "version")


def test_home_comes_from_the_environment_only_when_set_and_not_empty(monkeypatch):
    monkeypatch.setenv("FORKYARD_HOME", "")
    assert _fast.plan(["ls"]).options == {}
    monkeypatch.setenv("FORKYARD_HOME", "/e")
    assert _fast.plan(["ls"]).options == {"home": "/e"}
    assert _fast.plan(["ls", "--home", "/a"]).options == {"home": "/a"}


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["--debug"], ["--help", "--version"], ["--version=1"],
    ["--bogus", "--version"], ["--version", "--bogus"], ["-", "ls"], ["--", "ls"],
    ["create"], ["server", "--home", "x"], ["files", "get", "a", "b", "c"],
    ["ls", "--help"], ["ls", "extra"], ["ls", "--json=1"], ["ls", "--home"],
    ["ls", "--home", ""], ["ls", "--url", "--json"], ["ls", "--jso"],
    ["exec", "--help"], ["exec"], ["exec", "sb"], ["exec", "sb", "--"],
    ["exec", "sb", "ls", "-l"],  # click reads -l as an option of exec
    ["exec", "-e", "NOEQUALS", "sb", "--", "true"], ["exec", "-e", "=v", "sb", "true"],
    ["exec", "-eA=1", "sb", "true"], ["exec", "-de", "A=1", "sb", "true"],
    ["exec", "--timeout", "soon", "sb", "true"], ["exec", "--timeout", "-1", "sb", "true"],
    ["exec", "--cwd", "--", "sb", "true"], ["exec", "-z", "sb", "true"],
])
def test_everything_else_goes_to_the_typer_app(argv):
    assert _fast.plan(argv) is None


def _invoke_main(monkeypatch, capsysbinary, argv: list[str], stdin: bytes = b""
                 ) -> tuple[int, bytes, bytes]:
    monkeypatch.setattr(sys, "argv", ["forkyard", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    capsysbinary.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsysbinary.readouterr()
    return code, out, err


@pytest.fixture
def both(monkeypatch, tmp_path):
    """The fast path and the typer app against one fake control plane."""
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN", "FORKYARD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FORKYARD_HOME", str(tmp_path / "home"))
    fake = FakeAPI()
    cfg = ConnectionConfig("http://cp.test", "tok", transport=fake.transport())
    monkeypatch.setattr(_hot, "connect", lambda *a: SyncHTTP(cfg))
    monkeypatch.setattr(_sandboxes, "connect", lambda *a: SyncHTTP(cfg))
    return fake


def _same(monkeypatch, capsysbinary, argv: list[str], stdin: bytes = b""
          ) -> tuple[int, bytes, bytes]:
    assert _fast.plan(argv) is not None, "not a fast-path case"
    fast = _invoke_main(monkeypatch, capsysbinary, argv, stdin)
    typer_res = runner.invoke(app, argv, input=stdin)
    assert fast == (typer_res.exit_code, typer_res.stdout_bytes, typer_res.stderr_bytes)
    return fast


def test_ls_answers_as_the_typer_app(both, monkeypatch, capsysbinary):
    assert _same(monkeypatch, capsysbinary, ["ls", "--json"])[1] == b"[]\n"
    for _ in range(2):
        runner.invoke(app, ["create"])
    both.sandboxes["sb-00000000000000000001"]["error"] = "disk full"
    code, out, _ = _same(monkeypatch, capsysbinary, ["ls"])
    assert code == 0 and b"sb-00000000000000000002" in out and b"(disk full)" in out
    assert len(json.loads(_same(monkeypatch, capsysbinary, ["ls", "--json"])[1])) == 2


def test_exec_answers_as_the_typer_app(both, monkeypatch, capsysbinary):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    both.exit_code = 7
    code, out, err = _same(monkeypatch, capsysbinary, ["exec", sid, "--", "cat"], b"")
    assert (code, out, err) == (7, b"\xff", b"e")
    both.exit_code = 0
    code, out, _ = _same(monkeypatch, capsysbinary,
                         ["exec", "-e", "A=1", "--stdin", "--json", sid, "--", "ls", "-l"],
                         b"\x00data")
    body = json.loads(both.last("/exec").content)
    assert body["cmd"] == ["ls", "-l"] and body["env"] == {"A": "1"}
    assert code == 0 and json.loads(out)["exit_code"] == 0
    code, out, err = _same(monkeypatch, capsysbinary,
                           ["exec", "--timeout", "1", sid, "--", "sleep 100"])
    assert (code, out) == (124, b"so far") and b"timed out after 1s" in err
    code, _, err = _same(monkeypatch, capsysbinary, ["exec", "sb-nope", "--", "true"])
    assert code == 1 and err.startswith(b"error: no sandbox")


def test_exec_killed_by_a_signal_exits_128_plus_n_on_the_fast_path(both, monkeypatch,
                                                                   capsysbinary):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    plain = both.handle

    def killed(req: httpx.Request) -> httpx.Response:
        resp = plain(req)
        if req.url.path.endswith(("/exec", "/output", "/stream")):  # buffered or live
            return httpx.Response(200, content=json.dumps(
                {**json.loads(resp.content), "exit_code": -1, "signal": 9}) + "\n")
        return resp

    cfg = ConnectionConfig("http://cp.test", "tok", transport=httpx.MockTransport(killed))
    monkeypatch.setattr(_hot, "connect", lambda *a: SyncHTTP(cfg))
    monkeypatch.setattr(_sandboxes, "connect", lambda *a: SyncHTTP(cfg))
    assert _same(monkeypatch, capsysbinary, ["exec", sid, "--", "sleep 9"])[0] == 137


def test_configuration_errors_read_the_same_on_both_paths(monkeypatch, capsysbinary,
                                                          tmp_path):
    for var in ("FORKYARD_API_TOKEN", "FORKYARD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FORKYARD_HOME", str(tmp_path))
    monkeypatch.delenv("FORKYARD_URL", raising=False)
    code, _, err = _same(monkeypatch, capsysbinary, ["ls"])
    assert code == 1 and err.startswith(b"error: no forkyard control plane")
    monkeypatch.setenv("FORKYARD_URL", "ftp://x")  # reaches the SDK as an argument
    code, _, err = _same(monkeypatch, capsysbinary, ["exec", "sb", "true"])
    assert code == 1 and b"'ftp://x' (from argument)" in err


def test_debug_on_the_fast_path_shows_the_traceback(monkeypatch, capsysbinary, tmp_path):
    monkeypatch.delenv("FORKYARD_URL", raising=False)
    monkeypatch.delenv("FORKYARD_DEBUG", raising=False)
    code, _, err = _invoke_main(monkeypatch, capsysbinary,
                                ["--debug", "ls", "--home", str(tmp_path)])
    assert code == 1 and b"Traceback" in err and b"ConfigurationError" in err
    assert err.rstrip().splitlines()[-1].startswith(b"error: no forkyard control plane")


def test_a_rejected_option_gets_the_typer_apps_usage_error(monkeypatch, capsysbinary):
    code, out, err = _invoke_main(monkeypatch, capsysbinary,
                                  ["exec", "-e", "NOEQUALS", "sb-1", "--", "true"])
    assert code == 2 and out == b""
    assert b"'NOEQUALS' is not KEY=VALUE" in err and b"Usage: forkyard exec" in err


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, EOFError, BrokenPipeError])
def test_interrupts_end_as_in_the_typer_app(both, monkeypatch, capsysbinary, interrupt):
    def interrupted(*_a: object, **_k: object) -> None:
        raise interrupt

    monkeypatch.setattr(_hot, "run_ls", interrupted)
    monkeypatch.setattr(_sandboxes, "run_ls", interrupted)
    code, out, _ = _same(monkeypatch, capsysbinary, ["ls"])
    assert code == (130 if interrupt is KeyboardInterrupt else 1) and out == b""


def test_the_fast_path_knows_options_only_as_the_typer_commands_declare_them():
    from typer.main import get_command

    group = get_command(app)
    assert sorted(o for p in group.params for o in p.opts) == ["--debug", "--version"]
    for name, values, flags in (("ls", _fast._LS_VALUES, _fast._LS_FLAGS),
                                ("exec", _fast._EXEC_VALUES, _fast._EXEC_FLAGS)):
        declared = {o: p for p in group.commands[name].params for o in p.opts}
        for opt, key in {**values, **flags}.items():
            param = declared[opt]
            assert param.name == key, opt
            assert bool(getattr(param, "is_flag", False)) == (opt in flags), opt
            assert param.multiple == (key in _fast._MULTIPLE), opt
        assert declared["--home"].envvar == "FORKYARD_HOME"  # _fast reads it by name
    exec_params = {p.name: p for p in group.commands["exec"].params}
    assert exec_params["timeout"].default == _hot.EXEC_TIMEOUT
    assert [(p.name, p.nargs, p.required) for p in exec_params.values()
            if not p.opts[0].startswith("-")] == [("sandbox_id", 1, True), ("cmd", -1, True)]
