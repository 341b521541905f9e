"""``python -m kvtool`` runs the CLI."""

from kvtool.cli.app import main

main()
