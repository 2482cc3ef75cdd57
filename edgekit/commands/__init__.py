"""One module per `edgekit` subcommand (see edgekit/cli.py)."""


def check_numbers(a, rules: dict) -> None:
    """One-line refusal of a numeric flag that is NaN, infinite or out of range. rules: {dest: (low, high)} with
    None for an open end; a flag left unset (None) is skipped."""
    import math

    from edgekit.errors import EdgekitError

    for dest, (low, high) in rules.items():
        v = getattr(a, dest, None)
        if v is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = (f"at least {low:g}" if high is None else f"between {low:g} and {high:g}") if low is not None \
                else f"at most {high:g}"
            raise EdgekitError(f"{flag} {v:g} is not a usable value", f"pass a finite {flag} {span}")
