from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("targets", help="list device targets, or show one", description="List the device "
                       "profiles in targets/, or show one in full. A custom profile is any TOML file of the same "
                       "shape, passed as --target path/to/my.toml.",
                       epilog="examples:\n  edgekit targets\n  edgekit targets show jetson-orin --json\n"
                       "  edgekit targets show x86-cpu --toml > my-board.toml   (a profile to edit, for --target)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="target name, alias or path to a .toml (with `show`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--toml", action="store_true", help="with `show`: the profile as a TOML file --target accepts")
    p.set_defaults(func=run)


def run(a) -> int:
    from edgekit.errors import EdgekitError
    from edgekit.target import builtin_targets, get_target
    from edgekit.ui import print_json, table

    if a.action == "show":
        if not a.name:
            raise EdgekitError("`edgekit targets show` needs a target name", "e.g. edgekit targets show x86-cpu")
        t = get_target(a.name)
        if a.toml:
            print(t.to_toml(), end="")
        elif a.json:
            print_json(t.to_dict())
        else:
            def text(v):
                return ", ".join(v) if isinstance(v, (list, tuple)) else v

            d = t.to_dict()
            rows = [(k, text(v)) for k, v in d.items() if not isinstance(v, dict)]
            rows += [(f"{s}.{k}", text(v)) for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()]
            table(f"target {t.name}", rows, ("field", "value"))
        return 0
    ts = builtin_targets()
    if a.json:
        print_json([t.to_dict() for t in ts.values()])
        return 0
    table("targets", [(t.name, ", ".join(t.aliases), f"{t.memory.ram_gb:g} GB", t.cpu.arch, t.build.backend,
                       t.build.precision) for t in ts.values()],
          ("name", "aliases", "RAM", "CPU", "backend", "precision"))
    return 0
