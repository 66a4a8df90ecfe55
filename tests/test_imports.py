"""Module structure: no import cycle between voco modules (function-level imports included), and loading a run for
evaluation / prediction / export does not go through the training code."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _graph() -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for f in (SRC / "voco").rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("voco"):
                graph[m].update(t for t in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if t in mods)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    # the two circles this test was written for must be resolvable in the graph at all
    assert "voco.data.preprocess" in graph and "voco.omni.pseudolabel" in graph
    assert _cycles(graph) == []


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_run_loading_does_not_import_training():
    graph = _graph()
    for user in ("voco.runs", "voco.eval.evaluate", "voco.eval.predict"):
        assert not any(t.startswith("voco.train") for t in graph[user]), (user, graph[user])


def test_progress_lines_in_logs_and_bar_on_a_tty(caplog, capsys):
    """evaluate / convert / predict loops: periodic log lines without a terminal, a tqdm bar with one."""
    import logging

    from voco.progressbar import track

    log = logging.getLogger("voco.test.progress")
    with caplog.at_level(logging.INFO, logger="voco.test.progress"):
        assert list(track(range(5), "evaluate demo", logger=log, every_s=3600, tty=False)) == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("evaluate demo: 1/5 cases (20%)") and lines[-1].startswith("evaluate demo: 5/5 cases")
    assert len(lines) == 2  # first and last only, within every_s
    assert list(track(["a", "b"], "convert demo", unit="series", tty=True)) == ["a", "b"]
    err = capsys.readouterr().err
    assert "convert demo" in err and "2/2" in err
