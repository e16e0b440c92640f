"""`python -m llamarec` runs the command line."""

from llamarec.cli import main

main()
