"""Honest hints: every `(fix: ...)` names only flags the command it is printed by actually has.

Two checks. The real error paths of each command on tiny models (the printed line is parsed), and a static scan of
every EdgekitError/GateFailed site: its fix's flags must exist on every command that module's errors reach. Flags
inside a backticked `edgekit CMD ...` span are checked against CMD; other backticked spans are other tools'
commands (pip, trtexec) and are left alone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from edgekit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")
BACKTICK = re.compile(r"`([^`]*)`")
OTHER_TOOL = re.compile(r"\b(?:pip install|useradd|trtexec|docker buildx)\b[^,;)`]*")  # their flags, not ours


def command_options() -> dict[str, set[str]]:
    """{command: every option string of its parser, and of its subcommands' parsers (agent serve, ...)}."""
    import argparse

    def options(p: argparse.ArgumentParser) -> set[str]:
        out = set()
        for act in p._actions:
            out |= set(act.option_strings)
            if isinstance(act, argparse._SubParsersAction):
                for sp in act.choices.values():
                    out |= options(sp)
        return out

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: options(p) for name, p in sub.choices.items()}


OPTIONS = command_options()


def wrong_flags(fix: str, commands) -> list[str]:
    """The flags in `fix` that one of `commands` lacks (backticked edgekit commands are checked against their own)."""
    bad = []
    for span in BACKTICK.findall(fix):
        words = span.split()
        if words[:1] == ["edgekit"] and len(words) > 1 and words[1] in OPTIONS:
            bad += [f"{f} (`edgekit {words[1]}`)" for f in FLAG.findall(span) if f not in OPTIONS[words[1]]]
    plain = OTHER_TOOL.sub(" ", BACKTICK.sub(" ", fix))
    for cmd in commands:
        bad += [f"{f} ({cmd})" for f in FLAG.findall(plain) if f not in OPTIONS[cmd]]
    return bad


def test_wrong_flags_catches_the_reported_hints():
    assert wrong_flags("pass a smaller --align", ["build"]) == ["--align (build)"]
    assert wrong_flags("ask for --ratio 0.2 or less", ["build"]) == ["--ratio (build)"]
    assert wrong_flags("pass --prune-ratio 0.2 or less", ["build"]) == []
    assert wrong_flags("benchmark with `edgekit bench ARTIFACT --device URL`", ["verify"]) == []
    assert wrong_flags("`edgekit bench A --align 8`", ["verify"]) == ["--align (`edgekit bench`)"]
    assert wrong_flags("`pip install --no-deps x`; lower -p/-n", ["bench"]) == []
    assert wrong_flags("pip install --no-deps x, or pass --align 8", ["build"]) == ["--align (build)"]


# -- 1. the real error paths, per command ---------------------------------------------------------------------

def _cases(m, tmp):
    """(argv, a fragment of the expected error) on the tiny llama `m` (512 positions, hidden 64)."""
    (tmp / "full").mkdir()
    (tmp / "full" / "x.txt").write_text("not edgekit's")
    return [
        (["build", m, "-t", "raspberry-pi-5", "--prune-ratio", "0.3", "-o", tmp / "b"], "width alignment 256"),
        (["build", m, "-t", "x86-cpu", "--prune-ratio", "0.999", "-o", tmp / "b"], "removes at most"),
        (["build", m, "-t", "x86-cpu", "--context", "4096", "-o", tmp / "b"], "exceeds the model's 512"),
        (["build", m, "-t", "x86-cpu", "--backend", "gguf", "--precision", "8da4w", "-o", tmp / "b"], "8da4w"),
        (["build", m, "-t", "no-such-board"], "unknown target"),
        (["plan", m, "-t", "x86-cpu", "--context", "4096"], "exceeds the model's 512"),
        (["plan", m, "-t", "no-such-board"], "unknown target"),
        (["export", m, "-b", "onnxruntime", "--context", "4096", "-o", tmp / "e"], "exceeds the model's 512"),
        (["export", m, "-b", "onnxruntime", "-o", tmp / "full"], "not empty"),
        (["export", m, "-b", "gguf", "-p", "int8", "-o", tmp / "e"], "int8"),
        (["prune", m, "--ratio", "0.999", "-o", tmp / "p"], "removes at most"),
        (["prune", m, "--ratio", "0.3", "--align", "256", "-o", tmp / "p"], "--align 256"),
        (["prune", m, "--ratio", "0.3", "--protect", "0,1", "--non-uniform", "-o", tmp / "p"], "every layer"),
        (["prune", m, "--ratio", "0.3", "--protect", "0", "-o", tmp / "p"], "per-layer widths"),
        (["prune", m, "--ratio", "0.3", "--protect", "0", "--non-uniform", "-o", tmp / "p"], "unprotected"),
        (["prune", m, "--ratio", "0.3", "--seq-len", "4096", "-o", tmp / "p"], "--seq-len 4096"),
        (["prune", m, "--ratio", "0.3", "-o", tmp / "full"], "not empty"),
        (["distill", "--teacher", m, "--student", m, "--temperature", "0", "--steps", "1", "-o", tmp / "d"], "temperature"),
        (["verify", tmp / "full"], "not an edgekit artifact"),
        (["targets", "show", "no-such-board"], "unknown target"),
        (["docker", "build", "-t", "x86-cpu", "--image", "no-such-image", "--print"], "unknown image"),
    ]


def test_every_error_path_hints_only_its_commands_flags(tiny_models, tmp_path, capsys):
    from edgekit.cli import main

    m = tiny_models["llama"]
    seen, bad = [], []
    for argv, expect in _cases(m, tmp_path):
        argv = [str(x) for x in argv]
        if argv[0] not in OPTIONS:
            continue
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refused the flags themselves: the table is out of date
            pytest.fail(f"{argv}: argparse exit {e.code}: {capsys.readouterr().err}")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err, f"{argv}: exit {rc}, stderr {err}"
        line = err[-1]
        assert line.startswith("edgekit: error: ") and expect in line, f"{argv}: {line}"
        fix = re.search(r"\(fix: (.*)\)$", line)
        assert fix, f"{argv}: no fix in {line}"
        bad += [f"{' '.join(argv[:1])}: {w}: {line}" for w in wrong_flags(fix.group(1), [argv[0]])]
        seen.append(argv[0])
    assert not bad, "\n".join(bad)
    assert not any((tmp_path / d).exists() for d in "bepd")  # a refused request writes nothing
    assert {"build", "plan", "export", "prune", "verify", "targets"} <= set(seen)


def test_the_nonuniform_shortfall_hint_is_true(tiny_models, tmp_path, cli):
    """--ratio 0.3 with layer 0 of 2 protected is refused (0.5 works: the hidden width then takes the cut, so the
    refusal is not 'a smaller ratio' in general); the ratio the hint names works."""
    m = tiny_models["llama"]
    p = cli("prune", m, "--ratio", "0.3", "--non-uniform", "--protect", "0", "-o", tmp_path / "a", check=2)
    most = re.search(r"ask for --ratio ([0-9.]+) or less", p.stderr).group(1)
    cli("prune", m, "--ratio", most, "--non-uniform", "--protect", "0", "-o", tmp_path / "b", "--samples", "4",
        check=0)


# -- 2. every EdgekitError site ---------------------------------------------------------------------------------

# The commands whose users see a module's errors (edgekit/commands/NAME.py: NAME). build reaches prune's errors
# only through stages/prune.py's own check, which speaks build's flags (tested above).
REACH = {
    "edgekit/prune/": ("prune",), "edgekit/distill/": ("distill",), "edgekit/plan.py": ("plan", "build"),
    "edgekit/stages/": ("build",), "edgekit/pipeline.py": ("build",), "edgekit/export.py": ("export", "build"),
    "exporters/vision.py": ("vlm",), "exporters/mmproj.py": ("vlm",),  # VLM vision towers: `edgekit vlm export`
    "exporters/": ("export", "build"), "edgekit/fsutil.py": ("export", "prune", "distill"),
    "edgekit/images.py": ("docker",), "edgekit/runtime/bench.py": ("bench",),
    # the Python API: each verb's module speaks the flags of the command that is argparse around it
    "edgekit/api/building.py": ("build",), "edgekit/api/pruning.py": ("prune",),
    "edgekit/api/exporting.py": ("export",), "edgekit/api/benchmarking.py": ("bench",),
    "edgekit/api/matrix.py": ("bench",), "edgekit/matrix.py": ("bench",),
    "edgekit/vlm/": ("vlm",), "edgekit/vision/": ("vision",),
}
ERRORS = ("EdgekitError", "GateFailed")


def _strings(node, scope) -> list[str]:
    """String constants of a fix expression; a name is followed to its assignments in the enclosing function."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append(n.value)
        elif isinstance(n, ast.Name) and scope is not None:
            for a in ast.walk(scope):
                targets = a.targets if isinstance(a, ast.Assign) else [a.target] if isinstance(a, ast.AugAssign) else []
                if any(isinstance(t, ast.Name) and t.id == n.id for t in targets):
                    out += _strings(a.value, None)
    return out


def error_sites():
    """(path, line, fix text) of every EdgekitError(problem, fix) in edgekit/ and exporters/."""
    for path in sorted([*ROOT.glob("edgekit/**/*.py"), *ROOT.glob("exporters/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        funcs = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) in ERRORS):
                continue
            fix = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "fix"), None)
            if fix is None:
                continue
            scope = min((f for f in funcs if f.lineno <= call.lineno <= f.end_lineno),
                        key=lambda f: f.end_lineno - f.lineno, default=None)
            yield rel, call.lineno, " ".join(_strings(fix, scope))


def reach(rel: str) -> tuple[str, ...]:
    if rel.startswith("edgekit/commands/") and Path(rel).stem in OPTIONS:
        return (Path(rel).stem,)
    return next((cmds for prefix, cmds in REACH.items() if rel.startswith(prefix)), ())


def test_every_error_site_hints_only_flags_of_the_commands_it_reaches():
    sites = list(error_sites())
    assert len(sites) > 100  # the scan sees the codebase's errors
    bad = [f"{rel}:{line}: {w}: {fix!r}" for rel, line, fix in sites for w in wrong_flags(fix, reach(rel))]
    # and no hint anywhere names a flag that no command has
    every = set().union(*OPTIONS.values())
    bad += [f"{rel}:{line}: {f} is no command's flag: {fix!r}" for rel, line, fix in sites
            for f in FLAG.findall(OTHER_TOOL.sub(" ", BACKTICK.sub(" ", fix))) if f not in every]
    assert not bad, "\n".join(bad)
