"""``examples/prompts.parquet``: the README's example input, generated from the lab's labelled prompts.

Regenerate with ``python -m audit.lab.examples [PATH]`` (default ``examples/prompts.parquet``). The table
holds every lab prompt in the bundled table's row order, with a stable ``prompt_id`` (``lab-`` + the row
number, zero-padded) and ``prompt``; labels are left out on purpose (they are the lab's answers; join on
``prompt`` with :data:`audit.lab.LAB_PROMPTS` to check a run).
"""

from __future__ import annotations

from pathlib import Path


def examples_table(prompts_path: str | Path | None = None):
    """Return the example table (polars DataFrame: prompt_id str, prompt str) built from the lab prompts."""
    import polars as pl

    from audit.lab import LAB_PROMPTS

    lab = pl.read_parquet(prompts_path or LAB_PROMPTS, columns=["prompt"])
    return lab.with_row_index("n").select(
        pl.format("lab-{}", pl.col("n").cast(pl.Utf8).str.zfill(4)).alias("prompt_id"), pl.col("prompt"))


def write_examples(path: str | Path = "examples/prompts.parquet", prompts_path: str | Path | None = None) -> Path:
    """Write :func:`examples_table` to ``path`` (Parquet, parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples_table(prompts_path).write_parquet(path)
    return path


def main(argv: list[str] | None = None) -> Path:
    """``python -m audit.lab.examples [PATH]``: write the example table to PATH and print it. ``--help`` prints the
    usage and writes nothing; an unknown option or a second path is refused (exit 2) rather than taken as the
    output path (``--help`` was once written as a Parquet file of that name)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m audit.lab.examples",
                                     description="Write the README's example input (prompt_id, prompt) from the "
                                                 "lab's labelled prompts, without their labels.")
    parser.add_argument("path", nargs="?", default="examples/prompts.parquet",
                        help="Parquet file to write (default: examples/prompts.parquet)")
    path = write_examples(parser.parse_args(argv).path)
    print(path)
    return path


if __name__ == "__main__":
    main()
