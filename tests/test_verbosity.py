"""-q / -v on every command: -q leaves at most the one-line result (issue #17), -v shows the libraries' own logs, and
third-party INFO chatter (onnxruntime's quantizer logs a line per skipped node) lands in edgekit.log, not the terminal."""

from __future__ import annotations

import pytest


def _lines(p) -> list[str]:
    return [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]


def test_every_command_takes_q_and_v():
    from edgekit.cli import COMMANDS, _leaf_parsers, build_parser

    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= len(COMMANDS)  # agent's is `agent serve`
    for parser in leaves:
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= flags, parser.prog


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory):
    from edgekit.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("verbosity") / "ort"
    export_model(tiny_models["llama"], out, ExportConfig(backend="onnxruntime", context_length=128),
                 log=lambda *_: None)
    return out


def test_quiet_prints_at_most_one_line_on_success(cli, tiny_models, artifact, tmp_path):
    m = tiny_models["llama"]
    runs = {
        "targets": ("targets",),
        "targets show": ("targets", "show", "x86-cpu"),
        "plan": ("plan", m, "-t", "x86-cpu", "--context", "128"),
        "export int8": ("export", m, "-b", "onnxruntime", "-p", "int8", "--context", "128", "-o", tmp_path / "e"),
        "prune": ("prune", m, "--ratio", "0.25", "--criterion", "magnitude", "--samples", "4", "--no-reconstruct",
                  "-o", tmp_path / "p"),
        "verify": ("verify", artifact),
        "bench": ("bench", artifact, "-p", "8", "-n", "4", "-r", "1", "--seconds", "0.1", "--warmup", "0"),
        "build": ("build", m, "-t", "x86-cpu", "--context", "128", "--no-bench", "-o", tmp_path / "b"),
    }
    for name, argv in runs.items():
        p = cli(*argv, "-q", check=0)
        assert p.returncode == 0, (name, p.stderr[-2000:])
        assert len(_lines(p)) <= 1, (name, _lines(p))


def test_normal_run_keeps_library_chatter_off_the_terminal_and_verbose_shows_debug(cli, tiny_models, tmp_path):
    m = tiny_models["llama"]
    normal = cli("export", m, "-b", "onnxruntime", "-p", "int8", "--context", "128", "-o", tmp_path / "n", check=0)
    assert normal.returncode == 0 and "Skip to quantize" not in normal.stderr
    assert len(_lines(normal)) <= 4, _lines(normal)  # edgekit's own phases and the result
    verbose = cli("export", m, "-b", "onnxruntime", "-p", "int8", "--context", "128", "-o", tmp_path / "v", "-v",
                  check=0)
    assert verbose.returncode == 0 and len(_lines(verbose)) > len(_lines(normal))
    p = cli("plan", m, "-t", "x86-cpu", "-q", "-v", check=2)
    assert "not allowed with argument" in p.stderr


def test_library_logging_goes_to_the_log_file_not_the_terminal(tmp_path, capfd):
    """What a library logs at INFO (onnxruntime's quantizer calls logging.basicConfig(level=INFO) at import and then
    logs a line per node) lands in edgekit.log; the terminal stays clean and root is restored afterwards."""
    import logging

    from edgekit.ui import library_log

    root = logging.getLogger()
    before = list(root.handlers), root.level
    with library_log(tmp_path / "edgekit.log"):
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("some.library").info("skip node /model/layers.0/MatMul")
    assert "some.library INFO skip node /model/layers.0/MatMul" in (tmp_path / "edgekit.log").read_text()
    assert "skip node" not in capfd.readouterr().err
    assert (list(root.handlers), root.level) == before
