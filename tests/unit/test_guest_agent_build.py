"""The compiled agent is cached by its source: a changed agent.c is compiled again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from forkyard.host import agent


def test_a_changed_source_gets_a_new_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    compiled: list[bytes] = []

    def fake_run(argv: list[object], **_kw: object) -> SimpleNamespace:
        if argv[1] == "--version":
            return SimpleNamespace(text="gcc (fake) 12\n")
        out, src = Path(str(argv[argv.index("-o") + 1])), Path(str(argv[-1]))
        compiled.append(src.read_bytes())
        out.write_bytes(b"ELF of " + src.read_bytes())
        return SimpleNamespace(text="")

    source = [b"int main(void) { return 0; }\n"]
    monkeypatch.setattr(agent, "run", fake_run)
    monkeypatch.setattr(agent, "agent_source", lambda: source[0])
    first = agent.build_agent(tmp_path)
    assert agent.build_agent(tmp_path) == first and len(compiled) == 1  # cached
    source[0] = b"int main(void) { return 1; }\n"
    second = agent.build_agent(tmp_path)
    assert second != first and compiled[-1] == source[0]
    assert second.read_bytes() == b"ELF of " + source[0]


def test_the_packaged_source_is_the_one_in_the_tree():
    here = Path(__file__).resolve().parents[2] / "src/forkyard/guest/agent.c"
    assert agent.agent_source() == here.read_bytes()
