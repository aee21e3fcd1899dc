"""``python -m audit.cli``: the memaudit command line."""

from audit.cli import main

main()
