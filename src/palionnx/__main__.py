"""`python -m palionnx` is the `palionnx` command."""

from .cli.app import main

main()
