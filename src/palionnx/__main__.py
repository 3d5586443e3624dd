"""`python -m palionnx` is the `palionnx` command."""

from .cli.launcher import main

main()
