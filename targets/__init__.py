"""Target profiles, one TOML per device. Read through edgekit.targets (the loader is edgekit/target.py)."""
