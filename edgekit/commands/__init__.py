"""One module per `edgekit` subcommand (see edgekit/cli.py)."""
