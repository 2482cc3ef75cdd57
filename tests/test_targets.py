import json

import pytest

from edgekit.errors import EdgekitError
from edgekit.target import builtin_targets, get_target, load_target_file

REQUIRED = {"jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "jetson-nano-4gb", "raspberry-pi-5-8gb", "android-arm64",
            "x86-cpu"}


def test_builtin_targets_present_and_valid():
    ts = builtin_targets()
    assert REQUIRED <= set(ts)
    for t in ts.values():
        assert 0 < t.memory.usable_bytes < t.memory.ram_gb * 2**30
        assert t.build.precision in t.build.precisions
        assert t.docker.platform.startswith("linux/") and t.docker.base_image


def test_jetson_orin_alias_and_stack():
    t = get_target("jetson-orin")
    assert t.name == "jetson-orin-nano-8gb"
    assert t.accelerator.compute_capability == "8.7"
    assert (t.runtime.jetpack, t.runtime.tensorrt) == ("6.2", "10.3")
    assert t.build.backend == "tensorrt" and t.memory.shared_with_gpu


def test_unknown_target_lists_known_names():
    with pytest.raises(EdgekitError) as e:
        get_target("jetson-xavier")
    assert "unknown target 'jetson-xavier'" in str(e.value) and "x86-cpu" in str(e.value)


def _write(tmp_path, text):
    p = tmp_path / "board.toml"
    p.write_text(text)
    return p


GOOD = """
name = "my-board"
description = "test board"
[memory]
ram_gb = 2
os_reserve_gb = 0.5
[cpu]
arch = "aarch64"
cores = 4
[build]
backend = "onnxruntime"
precisions = ["int8"]
precision = "int8"
[docker]
platform = "linux/arm64"
base_image = "debian:bookworm-slim"
"""


def test_custom_target_file(tmp_path):
    t = get_target(str(_write(tmp_path, GOOD)))
    assert t.name == "my-board" and t.memory.usable_bytes == int(1.5 * 2**30) and t.build.width_alignment == 8


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.replace("ram_gb = 2", "ram_gb = 2\nram_gbb = 3"), "unknown key(s) ['ram_gbb']"),
    (lambda s: s.replace('precisions = ["int8"]', 'precisions = ["int8", "fp16"]'), "not supported by onnxruntime"),
    (lambda s: s.replace('precision = "int8"', 'precision = "fp32"'), "is not in build.precisions"),
    (lambda s: s.replace('backend = "onnxruntime"', 'backend = "tflite"'), "build.backend 'tflite'"),
    (lambda s: s.replace("os_reserve_gb = 0.5", "os_reserve_gb = 3"), "must be below ram_gb"),
    (lambda s: s.replace("cores = 4", 'cores = "four"'), "cpu].cores must be an integer"),
    (lambda s: s.replace("[docker]", "[dockerx]"), "unknown key(s) ['dockerx']"),
    (lambda s: s + "\n[[broken", "malformed target TOML"),
])
def test_invalid_target_files(tmp_path, mutate, needle):
    with pytest.raises(EdgekitError) as e:
        load_target_file(_write(tmp_path, mutate(GOOD)))
    assert needle in str(e.value)
    assert "fix:" in str(e.value)


def test_targets_cli(cli, tmp_path):
    out = json.loads(cli("targets", "--json", check=0).stdout)
    assert REQUIRED <= {t["name"] for t in out}
    show = json.loads(cli("targets", "show", "jetson-orin", "--json", check=0).stdout)
    assert show["memory"]["bandwidth_gbps"] == 68.0
    custom = json.loads(cli("targets", "show", _write(tmp_path, GOOD), "--json", check=0).stdout)
    assert custom["name"] == "my-board"
    bad = cli("targets", "show", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("edgekit: error: unknown target 'nope'")


def test_targets_show_toml_round_trips(cli, tmp_path):
    """`targets show NAME --toml` is a profile --target reads back unchanged: the hint of every bad-profile error."""
    import dataclasses

    for t in builtin_targets().values():
        path = _write(tmp_path, t.to_toml())
        assert dataclasses.replace(load_target_file(path), source=t.source) == t, t.name
    text = cli("targets", "show", "jetson-orin", "--toml", check=0).stdout
    back = json.loads(cli("targets", "show", _write(tmp_path, text), "--json", check=0).stdout)
    want = json.loads(json.dumps(get_target("jetson-orin").to_dict()))
    assert back == {**want, "source": str(tmp_path / "board.toml")}
    with pytest.raises(EdgekitError, match=r"`edgekit targets show x86-cpu --toml` prints a valid one"):
        load_target_file(_write(tmp_path, GOOD.replace("cores = 4", "cores = 0")))
    with pytest.raises(EdgekitError, match=r"--toml"):
        load_target_file(_write(tmp_path, "name = "))


def test_tables_are_never_cut_when_piped(cli, tiny_models, tmp_path):
    """`edgekit ... | cat` gets every name whole (it once printed `jetson-agx-or…`)."""
    names = [t.name for t in builtin_targets().values()]
    listing = cli("targets", check=0).stdout
    shown = cli("targets", "show", "jetson-agx-orin-64gb", check=0).stdout
    plan = cli("plan", tiny_models["llama"], "-t", "jetson-agx-orin-64gb", check=0).stdout
    dry = cli("build", tiny_models["llama"], "-t", "raspberry-pi-5-8gb", "--dry-run", "-o", tmp_path / "o",
              check=0).stdout
    for out in (listing, shown, plan, dry):
        assert "…" not in out and "│" not in out, out
    assert all(n in listing for n in names)
    assert "NVIDIA Jetson AGX Orin" in shown and "('" not in shown  # lists read as lists, not Python tuples


def test_table_wraps_on_a_narrow_terminal(monkeypatch, capsys):
    """On a terminal rich folds a cell that does not fit instead of cutting it."""
    import io
    import sys

    from edgekit.ui import table

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("COLUMNS", "24")
    table("targets", [("jetson-agx-orin-64gb", "jetson-agx-orin")], ("name", "aliases"))
    text = out.getvalue()
    assert "│" in text and "…" not in text  # rich drew it, and cut nothing
    first_column = "".join(ln.split("│")[1].strip() for ln in text.splitlines() if ln.startswith("│"))
    assert "jetson-agx-orin-64gb" in first_column, text  # folded over lines, every character kept
