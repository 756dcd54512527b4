"""``python -m qcow2snap``: the command line."""

from .cli import main

main()
