"""``python -m audit``: the memaudit command line, as the ``memaudit`` script (:func:`audit.cli.main`: the same
commands, messages and exit codes). For an environment whose scripts folder is not on ``PATH`` (a scheduler's bare
``PATH``, a venv that is not activated): ``/path/to/venv/bin/python -m audit run ...``. ``python -m audit.cli`` is the
same."""

from audit.cli import main

if __name__ == "__main__":  # importing audit.__main__ (a tool that walks the package) runs nothing
    main()
