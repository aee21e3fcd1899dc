"""Command ``docs`` (mounted by :mod:`audit.cli`): the guides that messages and ``--help`` point to
(``memaudit docs lab``), from wherever this memaudit is installed (:mod:`audit.guides`). Owns this command's options
and output only. Must not import any heavy library, nor :mod:`audit.cli` itself (it mounts this module)."""

from __future__ import annotations

from typing import Optional

import typer

DOCS_HELP = "\n".join([
    "List the guides, or print one (Markdown) to standard output.",
    "",
    "Messages and --help point to a guide as `memaudit docs NAME`.",
    "The guides are the repository's docs/*.md, installed with memaudit.",
    "",
    "  memaudit docs              # each guide's name and title, and their folder",
    "  memaudit docs lab | less   # the lab guide",
    "  memaudit docs lab --path   # its file (for an editor or a Markdown viewer)",
])


def register(app: typer.Typer) -> None:
    """Add ``docs`` to the memaudit app."""
    from audit.cli.common import guarded

    @app.command("docs", help=DOCS_HELP, short_help="List the guides (docs/*.md, installed with memaudit), or print "
                 "one: memaudit docs NAME.")
    def docs_cmd(
        name: Optional[str] = typer.Argument(None, metavar="NAME", help="A guide: architecture, audits, gpu, lab, "
                                             "mitigation or ray (lab.md and docs/lab.md are read as lab). Without "
                                             "it: the list."),
        path: bool = typer.Option(False, "--path", help="Print the guide's file instead of its text (without NAME: "
                                  "the folder of the guides)."),
    ) -> None:
        def go():
            from audit import guides

            if name is None:
                if path:
                    folder = guides.guides_dir()
                    if folder is None:
                        guides.find("")  # the RunError saying where the guides were looked for
                    typer.echo(str(folder))
                    return
                found = guides.guides()
                if not found:
                    guides.find("")
                width = max(len(n) for n in found)
                for n, file in found.items():
                    typer.echo(f"{n:<{width}}  {guides.title(file)}")
                typer.echo(f"(in {guides.guides_dir()}; `memaudit docs NAME` prints one)")
                return
            file = guides.find(name)
            if path:
                typer.echo(str(file))
                return
            typer.echo(file.read_text(encoding="utf-8"), nl=False)

        guarded(go, resumable=False)
