"""``python -m spasem`` runs the command line."""

from spasem.cli.main import main

main()
