"""Prompt sources: find input files on any fsspec URL, cut them into units of work, stream their rows.

Formats: Parquet (``.parquet``, ``.pq``), JSON lines (``.jsonl``, ``.ndjson``), CSV (``.csv``) and plain
text (``.txt``, one prompt a line). Folders are listed recursively; marker and hidden files (``_SUCCESS``,
``_common_metadata``, ``.crc`` ...) and unknown extensions are skipped and listed in the manifest.

The prompt column may be given as several names (``--prompt-column prompt --prompt-column text``: logs whose
writer renamed it): each row takes the first of them that holds a value in it (:func:`first_filled`: a file with
both columns reads the second where the first is null, empty or blank, :func:`holds_value`); a row with none of
them is a ``missing_prompt_column`` reject.

A unit of work is a row range of one file (Parquet: whole row groups where possible), at most
``unit_rows`` rows; it is read independently of every other unit, so it can be retried or run on
another worker. Every row of a unit comes out either as a prompt to score or as a reject with a reason.

Owns input discovery, units and row validation. Must not import torch, the scorers, the models or
anything that writes outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, asdict
import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import sys
import threading
import unicodedata

import pyarrow as pa

from audit.errors import SourceError
from audit.text import code_points

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}
# compressed text inputs (``prompts.jsonl.gz``), read through fsspec's compression="infer"; Parquet compresses
# inside the file, and its readers need random access, so ``.parquet.gz`` is not read
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
BOM = b"\xef\xbb\xbf"
READ_BATCH_ROWS = 8192
CSV_BLOCK_BYTES = 1 << 24  # pyarrow's CSV block: a row (a record, its quoted line breaks included) fits in one
csv.field_size_limit(CSV_BLOCK_BYTES)  # the record reader (_csv_records) reads fields as long as pyarrow does



def prompt_names(prompt_column: str | tuple[str, ...]) -> tuple[str, ...]:
    """The names ``--prompt-column`` gives, in order: one name (a string) or several (a tuple), of which each row
    of a file, or each JSON line, reads the first that holds a value in it (:func:`first_filled`)."""
    return (prompt_column,) if isinstance(prompt_column, str) else tuple(prompt_column)


def prompt_column_text(prompt_column: str | tuple[str, ...]) -> str:
    """The prompt column's name(s) quoted for a message: ``'prompt'``, or ``'prompt' or 'text'``."""
    return " or ".join(map(repr, prompt_names(prompt_column)))


def first_present(names: tuple[str, ...], present) -> str | None:
    """The first of ``names`` in ``present`` (a file's column names, a JSON object's keys), or None."""
    return next((c for c in names if c in present), None)


def first_filled(names: tuple[str, ...], row: dict) -> str | None:
    """The name a row's prompt is read from: the first of ``names`` that ``row`` (a JSON object, a CSV record's
    fields by name) holds a value for (:func:`holds_value`: ``{"prompt": null, "text": "a cat"}`` and
    ``{"prompt": "", "text": "a cat"}``, as a writer that renamed the column and still writes the old key empty
    gives, read ``a cat``), else the first it has at all (its prompt then null or blank), else None (none of them:
    ``missing_prompt_column``)."""
    present = [c for c in names if c in row]
    return next((c for c in present if holds_value(row[c])), present[0] if present else None)


def holds_value(value) -> bool:
    """Whether a prompt cell holds a value for choosing among several ``--prompt-column`` names: not null, and not
    text that shows nothing (:func:`is_blank`: ``""``, spaces, invisible characters), which would be rejected as
    ``empty_prompt`` whichever column it came from, so the next name is read instead. A value of another type
    holds one (its row is then a ``prompt_not_string`` reject, as with one name)."""
    return value is not None and not (isinstance(value, str) and is_blank(value))


@dataclass(frozen=True)
class InputFile:
    """One input file: its URL (as fsspec understands it) and format."""

    url: str
    fmt: str


@dataclass(frozen=True)
class Unit:
    """A unit of work: rows ``[start, stop)`` of one file.

    ``byte_offset`` is where row ``start`` begins (line formats only). ``missing_column`` is set when the
    file's schema (Parquet, CSV) lacks the prompt column: all its rows are rejected with reason
    ``missing_prompt_column`` (a JSON-lines file has no schema: each line is judged alone).
    """

    index: int
    url: str
    fmt: str
    start: int
    stop: int
    byte_offset: int = 0
    missing_column: bool = False

    @property
    def rows(self) -> int:
        """Rows in the unit, ``stop - start``."""
        return self.stop - self.start

    def to_dict(self) -> dict:
        """The unit as a JSON-ready dict (as ``run.json`` records it)."""
        return asdict(self)


@dataclass
class Plan:
    """Units of work over all inputs, plus what was skipped; ``columns``: each file's column names where its
    format has a schema (Parquet, CSV; a JSON-lines file's first record)."""

    files: list[InputFile]
    units: list[Unit]
    skipped: list[dict] = field(default_factory=list)
    file_rows: dict[str, int] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        """Rows in all units (the rows the run will read)."""
        return sum(u.rows for u in self.units)


def text_or_escaped(text: str) -> tuple[str, bool]:
    """``(text, False)``, or for a string that cannot be written as UTF-8 (a lone surrogate, e.g. from a JSON
    escape ``"\\ud83d"`` cut from an emoji pair) ``(text with each surrogate written as an escape, True)``:
    ``"half \\ud83d"`` becomes the 12 characters ``half \\ud83d``, backslash included."""
    if text.isascii():
        return text, False
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8"), True


def error_line(exc: BaseException) -> str:
    """``"OSError: Invalid BYTE_ARRAY value"``: a reader's error in one line (its first), at most 300 characters."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def normalize_prompt(text: str) -> str:
    """Unicode NFC, then strip surrounding whitespace (prompts equal after this are one prompt)."""
    return unicodedata.normalize("NFC", text).strip()


# letters and symbols that are drawn as nothing: Hangul fillers (U+115F, U+1160, U+3164, U+FFA0), the braille
# blank U+2800, the Khmer inherent vowels U+17B4-17B5, the combining grapheme joiner U+034F, and variation
# selectors (U+FE00-FE0F, U+E0100-E01EF, Mongolian U+180B-180D and U+180F); Unicode lists most of them as
# Default_Ignorable_Code_Point
_BLANK_LOOKING = frozenset([0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164,
                            0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])


def is_blank(text: str) -> bool:
    """Whether a prompt shows nothing: empty, or only whitespace, control characters (Unicode category Cc: NUL,
    escape, DEL, C1), invisible format characters (category Cf: zero-width space U+200B, zero-width
    (non-)joiners, word joiner, byte-order mark, soft hyphen, direction marks, tag characters) and characters
    drawn as nothing (:data:`_BLANK_LOOKING`: the Hangul filler U+3164, the braille blank U+2800 ...). Such a
    prompt is rejected as ``empty_prompt``; a visible prompt keeps them (a zero-width joiner inside an emoji
    sequence is part of it)."""
    return all(ch.isspace() or ord(ch) in _BLANK_LOOKING or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def name_part(url: str) -> str:
    """``url`` as far as its name goes: an http(s) URL without its ``?query`` and ``#fragment`` (a presigned
    object-store URL, ``https://.../part-0.parquet?X-Amz-Signature=...``, names a ``.parquet`` file); any other
    URL or path unchanged (a local file may hold ``?`` or ``#`` in its name)."""
    if url[:8].lower().startswith(("http://", "https://")):
        return url.split("#", 1)[0].split("?", 1)[0]
    return url


def _shown_ext(name: str) -> str:
    """The extension of ``name`` as a refusal names it: with the one before a compression suffix (``.json.gz``,
    ``.parquet.gz``), since the compression is not what memaudit cannot read; ``""`` for none."""
    stem, ext = os.path.splitext(name.lower())
    return os.path.splitext(stem)[1] + ext if ext in COMPRESSIONS else ext


def format_of(name: str) -> str | None:
    """The format of a file name (``None`` if memaudit does not read it): by extension, after a compression
    suffix of :data:`COMPRESSIONS` for the text formats."""
    stem, ext = os.path.splitext(name.lower())
    if ext in COMPRESSIONS:
        fmt = FORMATS.get(os.path.splitext(stem)[1])
        return fmt if fmt in ("txt", "jsonl", "csv") else None
    return FORMATS.get(ext)


def _open(url: str):
    """A binary file object for ``url``, decompressed when its name ends in a :data:`COMPRESSIONS` suffix; it
    iterates by lines whatever the compression. A compressed stream cut short raises ``EOFError`` at its end
    (gzip and bz2 do; zstd through :class:`_ZstdReader`, which also reads every frame of a multi-frame file)."""
    fs, path = _fs(url)
    ext = os.path.splitext(name_part(path).lower())[1]
    if ext == ".zst":
        return io.BufferedReader(_ZstdReader(fs.open(path, "rb")))
    fh = fs.open(path, "rb", compression=COMPRESSIONS.get(ext))
    return fh if isinstance(fh, io.IOBase) else io.BufferedReader(fh)


class _ZstdReader(io.RawIOBase):
    """A zstd-compressed stream, decompressed: every frame in turn (``zstd`` of concatenated files writes several),
    and ``EOFError`` when the input ends inside a frame (a file cut short), where zstandard's ``stream_reader``, as
    fsspec opens ``.zst``, stops at the first frame's end and ends a cut frame silently (a shorter file). Bytes that
    are not zstd raise ``OSError`` (as gzip and bz2 do), not zstandard's ``ZstdError``."""

    CHUNK = 1 << 16  # compressed bytes read at a time

    def __init__(self, raw):
        import zstandard

        self._raw, self._zd, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._dobj = self._zd.decompressobj()
        self._buf, self._in_frame, self._ended = b"", False, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf and not self._ended:
            data = self._raw.read(self.CHUNK)
            if not data:
                self._ended = True
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame (the file was cut short)")
                break
            out = []
            while data:
                try:
                    out.append(self._dobj.decompress(data))
                except self._error as exc:  # not an OSError: damaged input must read as a file that cannot be read
                    raise OSError(f"the zstd stream cannot be decompressed ({exc})") from exc
                self._in_frame = True
                if not self._dobj.eof:
                    break
                data = self._dobj.unused_data  # the next frame begins here
                self._dobj, self._in_frame = self._zd.decompressobj(), False
            self._buf = b"".join(out)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _seek(fh, offset: int) -> None:
    """Move ``fh`` to byte ``offset`` (of the decompressed stream), reading forward where it cannot seek."""
    try:
        fh.seek(offset)
    except (io.UnsupportedOperation, OSError):
        left = offset
        while left > 0 and (chunk := fh.read(min(left, 1 << 22))):
            left -= len(chunk)


def _fs(url: str):
    """``(file system, path)`` for ``url`` (fsspec).

    Raises:
        SourceError: an unknown protocol, or one whose fsspec implementation needs packages not installed.
    """
    import fsspec

    if "::" in url and os.path.exists(url):  # a local name holding '::', which fsspec would read as a chain
        return fsspec.filesystem("file"), os.path.abspath(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise SourceError(f"{url}: reading this kind of URL needs packages that are not installed ({exc})") from None
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        raise SourceError(f"{url}: {exc} (fsspec reads file://, s3://, gs://, az://, http(s):// and more, each "
                          "with its package installed)") from None


def _unstrip(fs, path: str) -> str:
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _special_file(path: str) -> bool:
    """Whether a local ``path`` is a named pipe, socket or device (followed through links): opening a named pipe
    blocks until something writes to it, so a ``logs.jsonl`` FIFO left in a log folder held the run (and
    ``--dry-run``) forever before any line was printed. A path that cannot be stat'ed is not special here (a
    link to nothing is refused when the file is read, naming it)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _relative_to_cwd(fs, raw: str) -> str:
    """For a relative local input that does not exist, the working folder it was looked for in (`` (relative to
    the working folder /srv/audits)``), else ``""``: cron and systemd start a job in the home folder, and a
    config's relative ``inputs`` are relative to the working folder, not to the config, so "prompt-logs/: no
    such file or folder" alone did not say where it was looked for."""
    if not _is_local(fs) or "://" in raw or os.path.isabs(os.path.expanduser(raw)):
        return ""
    try:
        return f" (relative to the working folder {os.getcwd()})"
    except OSError:
        return ""


def discover(inputs: list[str]) -> tuple[list[InputFile], list[dict]]:
    """Expand input paths, folders and globs into files; return ``(files, skipped)``. A path that exists is
    used literally; only a path that does not is expanded as a glob.

    Raises:
        SourceError: an input matches nothing, or is a chained fsspec URL (``zip://a.parquet::logs.zip``,
            ``simplecache::s3://...``): each file found in it would be named without the chain, so it is refused.
    """
    files: list[InputFile] = []
    skipped: list[dict] = []
    for raw in inputs:
        if not raw.strip() and (not raw or not os.path.exists(raw)):
            # '' is the working folder to fsspec: `memaudit run "$LOGS"` with LOGS unset read every prompt file
            # under the working folder (a home folder, a repository) and scored them as the night's logs, exit 0
            raise SourceError(f"an input is empty ({raw!r}): give a file, folder, glob or URL (a variable that "
                              "named the inputs is unset or blank?); '.' names the working folder")
        if "::" in raw and not os.path.exists(raw):
            raise SourceError(f"{raw}: chained fsspec URLs (with '::', as zip://...::archive.zip or simplecache::...) "
                              "are not supported: give the files themselves (unpack an archive) or the URL without "
                              "the chain")
        if raw[:17].lower() == "file://localhost/":  # RFC 8089's other spelling of file:/// (fsspec took the host
            raw = "file:///" + raw[17:]  # for a relative folder named localhost)
        fs, path = _fs(raw)
        if _is_local(fs) and raw[:7].lower() == "file://" and "%" in path and not fs.exists(path):
            from urllib.parse import unquote  # RFC 8089: a file URL is percent-encoded (pathlib's as_uri())

            path = unquote(path)
        if _is_local(fs):  # one spelling per file: "a/../a/x.parquet" is "a/x.parquet" (sources, ids, resuming)
            path = _normal_local(path)
        literal = fs.exists(path)  # an existing path is taken as it is, even with [ ] * ? in its name
        if not literal and any(ch in name_part(path) for ch in "*?["):
            path = path.rstrip("/") or path  # 'logs/dt=*/' names folders as 'logs/dt=*' does (fsspec's http glob
            matches = sorted(fs.glob(path) or _decoded_glob(fs, path))  # matched nothing with the slash)
            root = _glob_root(path)
            unlisted = _unlisted_under_glob(root, path) if _is_local(fs) else []  # fsspec's glob passes them over
            if not matches:
                why = f" it can read ({unlisted[0]['reason']})" if unlisted else ""
                raise SourceError(f"{raw}: the pattern matches no file{why}")
            skipped += unlisted
            candidates = _hidden_matches(fs, path, root, _glob_files(fs, path, root, matches, skipped), skipped)
            candidates = _drop_outputs(fs, root, candidates, skipped)  # earlier runs' tables
        elif fs.isdir(path):
            candidates = _drop_outputs(fs, path, _files_under(fs, path, skipped), skipped)  # earlier runs' tables
        elif literal:
            ext = _shown_ext(name_part(path).rsplit("/", 1)[-1])
            if format_of(name_part(path).rsplit("/", 1)[-1]) is None:
                raise SourceError(f"{raw}: unsupported file type {ext or '(no extension)'}; memaudit reads "
                                  f"{', '.join(sorted(FORMATS))} (the text formats also compressed: "
                                  f"{', '.join(COMPRESSIONS)})")
            candidates = [path]
        else:
            if _is_local(fs) and os.path.islink(path):  # a link to nothing, or to itself: say so
                raise SourceError(f"{raw}: a link whose target does not exist ({os.readlink(path)})")
            raise SourceError(f"{raw}: no such file or folder{_relative_to_cwd(fs, raw)}")
        for p in candidates:
            name = name_part(p).rstrip("/").rsplit("/", 1)[-1]
            url = _unstrip(fs, p)
            ext = _shown_ext(name)
            if name.startswith(("_", ".")):
                skipped.append({"path": url, "reason": "marker or hidden file"})
            elif format_of(name) is None:
                spark = name.startswith("part-") and ext.split(".")[1:2] == ["json"]  # Spark's write.json
                skipped.append({"path": url, "reason": f"unsupported extension {ext or '(none)'}" + (
                    "; Spark's write.json writes JSON lines, which memaudit reads named .jsonl" if spark else "")})
            elif _is_local(fs) and _special_file(p):  # opening a named pipe waits for a writer: planning hung
                skipped.append({"path": url, "reason": "not a regular file (a named pipe, socket or device)"})
            else:
                files.append(InputFile(url, format_of(name)))
    # a path holding bytes that are not UTF-8 is recorded with them escaped: the manifest is read back as text, and
    # the report's Markdown and HTML files could not be written with it (UnicodeEncodeError, exit 1)
    skipped[:] = [s | {"path": name_not_utf8(s["path"]) or s["path"]} for s in skipped]
    listed: set = set()  # each skipped entry once (named by two inputs, or by a glob's folder and its wildcard)
    skipped[:] = [s for s in skipped if not ((key := tuple(sorted(s.items()))) in listed or listed.add(key))]
    seen: set[str] = set()  # a file once, whichever spelling names it (the first spelling is kept)
    unique = [f for f in files if not ((key := _same_file_key(f.url)) in seen or seen.add(key))]
    if not unique and skipped and all(s["reason"] == "marker or hidden file" for s in skipped) \
            and any(s["path"].rstrip("/").rsplit("/", 1)[-1] == "_SUCCESS" for s in skipped):
        # a Spark/Hadoop job's output holding its success marker and no data file: a complete dataset of no rows,
        # read as inputs with no rows are (a warning, exit 0), not as a path that names nothing readable
        return [], skipped
    if not unique:
        if unlisted := unlisted_summary(skipped):  # named as a run that found other files names them (build_plan)
            raise SourceError(f"no readable prompt file in {', '.join(inputs)}: {unlisted}{NOTHING_TO_SKIP_HINT}")
        why = "; ".join(f"{s['path']} ({s['reason']})" for s in data_first(skipped)[:5]) or "nothing found"
        raise SourceError(f"no readable prompt file in {', '.join(inputs)}: {why}")
    return unique, skipped


def _same_file_key(url: str) -> str:
    """What names one file however it is spelled: a local file's real path (links resolved); an http(s) URL
    percent-decoded, as its server reads it (a server's folder listing names ``dt=2026-12-01/`` as
    ``dt%3D2026-12-01/``: ``http://h/logs/`` given with ``http://h/logs/dt=2026-12-01/`` read that partition
    twice, its rows counted twice); any other URL as written."""
    if url.startswith("/"):
        return os.path.realpath(url)
    if url[:8].lower().startswith(("http://", "https://")):
        from urllib.parse import unquote

        return unquote(url)
    return url


_HOLD_NO_PROMPTS = ("marker or hidden file", "a memaudit output folder")


def data_first(skipped: list[dict]) -> list[dict]:
    """Skipped input files, those that may hold prompts first (an unsupported extension such as a ``.json`` export,
    an unreadable file), then markers, hidden files and memaudit output folders, each group in its order: a line
    naming the first few must not hide the one data file behind a Spark folder's ``_SUCCESS`` and ``.crc`` files."""
    return sorted(skipped, key=lambda s: str(s.get("reason", "")).startswith(_HOLD_NO_PROMPTS))


def _normal_local(path: str) -> str:
    """``path`` without ``.`` and ``..`` segments, when that names the same file: a ``..`` after a link to a folder
    climbs from the link's target, not from where the link is, so such a path has its links resolved instead."""
    norm = os.path.normpath(path)
    if ".." not in path.split("/") or norm == path:
        return norm
    try:
        return norm if os.path.samefile(norm, path) else os.path.realpath(path)
    except OSError:  # one of them does not exist (a glob pattern, a missing file): said later, as given
        return os.path.realpath(path) if os.path.exists(path) else path


UNLISTED = "cannot list the folder"  # a local folder under an input that cannot be read (:func:`_files_under`)


def _unlisted_under_glob(root: str, pattern: str) -> list[dict]:
    """The local folders that glob ``pattern`` (fixed part ``root``) would look into but cannot list (no
    permission), as :func:`_files_under` records them: fsspec's glob passes them over without a word, so
    ``'logs/*/part-0.*'`` read one day of two, exit 0, when the other day's folder was another user's mode 700.
    A folder the pattern matches whole is left to :func:`_files_under`, which reads it; hidden and marker folders
    (``.*``, ``_*``) that a wildcard would match are not entered (:func:`_hidden_matches`)."""
    import fnmatch

    parts = pattern[len(root):].strip("/").split("/")
    deep = "**" in parts
    found: list[dict] = []
    seen: set[str] = set()

    def walk(folder: str, depth: int) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(folder) as entries:
                folders = [e for e in entries if _is_folder(e)]
        except OSError as exc:
            found.append({"path": folder, "reason": f"{folder}: {UNLISTED} ({exc.strerror or exc})",
                          "unreadable": True})
            return
        for e in folders:
            if deep:
                if e.name.startswith((".", "_")) and e.name not in parts:
                    continue
            elif depth >= len(parts) - 1 or not fnmatch.fnmatchcase(e.name, parts[depth]) \
                    or (e.name.startswith((".", "_")) and e.name != parts[depth]):
                continue
            walk(folder.rstrip("/") + "/" + e.name, depth + 1)

    walk(root or ".", 0)
    return found


def _is_folder(entry) -> bool:
    try:
        return entry.is_dir()  # follows a link
    except OSError:
        return False


def _files_under(fs, root: str, skipped: list[dict]) -> list[str]:
    """The files under folder ``root``, sorted. Folders named ``.*`` or ``_*`` (hidden, or a writer's
    ``_temporary``, as pyarrow datasets ignore them) are not entered and are added to ``skipped``. On a local
    disk, links to folders are followed, each real folder read once (a link back up the tree is skipped); a
    folder that cannot be listed (no permission) is added to ``skipped`` as unreadable, its reason holding
    :data:`UNLISTED` (:func:`unlisted_folders`)."""
    def hidden(name: str) -> bool:
        return name.startswith((".", "_"))

    if not _is_local(fs):
        out, cuts = [], set()
        for p in fs.find(root):
            rel = p[len(root.rstrip("/")) + 1:].split("/")
            i = next((i for i, part in enumerate(rel[:-1]) if hidden(part)), None)
            if i is None:
                out.append(p)
            elif (cut := _unstrip(fs, root.rstrip("/") + "/" + "/".join(rel[:i + 1]))) not in cuts:
                cuts.add(cut)
                skipped.append({"path": cut, "reason": "hidden or marker folder"})
        return sorted(out)
    out, seen, stack = [], set(), [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            skipped.append({"path": folder, "reason": "a link to a folder already read"})
            continue
        seen.add(real)
        try:  # listed whole here: a folder can open and then fail while it is read (/proc/1/map_files: EACCES)
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:  # no permission to list it (logs written by another user): its files are unknown
            skipped.append({"path": folder, "reason": f"{folder}: {UNLISTED} ({exc.strerror or exc})",
                            "unreadable": True})
            continue
        for entry in entries:
            path = folder.rstrip("/") + "/" + entry.name
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if not is_dir:
                out.append(path)
            elif hidden(entry.name):
                skipped.append({"path": path, "reason": "hidden or marker folder"})
            else:
                stack.append(path)
    return sorted(out)


# What each memaudit command writes in its output folder, its identity file first (audit.pipeline.check_out_dir,
# and memaudit report and calibrate, which refuse to write over them, read them here too).
RUN_FILES = ("run.json", "shards", "risk.parquet", "rejects.parquet", "manifest.json")  # memaudit run's --out
GENERATE_FILES = ("generate.json", "images", "parts", "generations.parquet", "summary.json")  # memaudit generate's
SKIP_BAD_FILES_HINT = " (--skip-bad-files skips such files and goes on)"  # `memaudit run` has the option, generate not
# when nothing else readable was found: skipping the folders leaves nothing to score
NOTHING_TO_SKIP_HINT = (" (--skip-bad-files skips such folders, and finds no other prompt file here: give a folder "
                        "memaudit can read)")
LOCK_NAME = ".memaudit.lock"  # the lock a command holds in its output folder while it writes (audit.pipeline.out_lock)
# A score cache's folder (audit.cache) holds key.json, part-*.parquet and damaged/: all of it is the cache's.
# (part names as audit.cache.ScoreCache writes them, so that a Spark folder's part-00000-....snappy.parquet files
# cost no look for a key.json)
_CACHE_ENTRY = re.compile(r"key\.json|part-(?:.+-)?[0-9a-f]{12}\.parquet|damaged")
# the identity file of a memaudit output folder, the keys it always has, and what the command writes beside it
# (None: the whole folder is the command's)
_OUTPUT_MARKERS = {"run.json": (("schema_version", "model_fingerprint", "score_config"), RUN_FILES),
                   "generate.json": (("model_fingerprint", "prompts_sha256"), GENERATE_FILES),
                   "key.json": (("model_fingerprint", "score_config"), None)}
_MANIFEST_KEYS = ("schema_version", "memaudit_version", "counts", "score_config")  # a run's manifest.json
_UNIT_DONE = re.compile(r"unit-\d+\.done\.json")  # a run's committed unit (audit.unit.shard_paths)


def _marker_for(entry: str) -> str | None:
    """The identity file of the kind of output folder that writes an entry named ``entry``, if any."""
    for marker, (_, owned) in _OUTPUT_MARKERS.items():
        if entry in (owned or ()) or (owned is None and _CACHE_ENTRY.fullmatch(entry)):
            return marker
    return None


def _drop_outputs(fs, root: str, candidates: list[str], skipped: list[dict]) -> list[str]:
    """``candidates`` (files under folder ``root``, or matches of a glob whose fixed part is ``root``) without the
    files that memaudit wrote: a file is dropped when a folder F at or below ``root`` is a memaudit output folder
    (its identity file ``run.json``, ``generate.json`` or a score cache's ``key.json`` is there, a JSON object with
    the command's keys, so a user's own run.json is not taken) and the file lies in an entry the command writes
    in F (:data:`RUN_FILES`, :data:`GENERATE_FILES`; all of a cache folder). A user's other files kept in such a
    folder (``--out`` given as the folder of the inputs) are still read. Each such folder is added to
    ``skipped``: reason ``a memaudit output folder`` when nothing in it is read, else the entries skipped. A run
    folder whose run.json is gone or damaged is still known by its manifest.json or a committed unit
    (``shards/unit-N.done.json``), and a score cache whose key.json is not JSON by that file, so that a damaged
    earlier run's tables are never read as prompts either.

    Only folders where a candidate's path continues with an entry a command writes are checked, one read of one
    identity file each, so a glob over many partitions costs no extra request for them.
    """
    root = root.rstrip("/")
    verdicts: dict[tuple[str, str], bool] = {}

    def read(path: str):  # a JSON document, "damaged" when the file is there but not JSON, None when missing
        try:
            with fs.open(path, "rb") as fh:
                raw = fh.read(1 << 20)
        except OSError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return "damaged"

    def has(doc, keys) -> bool:
        return isinstance(doc, dict) and all(k in doc for k in keys)

    def is_output(folder: str, marker: str) -> bool:
        if (folder, marker) not in verdicts:
            doc = read(f"{folder}/{marker}")
            found = has(doc, _OUTPUT_MARKERS[marker][0])
            if not found and marker == "key.json":  # a cache whose key.json is damaged: its parts are no prompts
                found = doc == "damaged"
            if not found and marker == "run.json":  # a run whose run.json is gone or damaged: its manifest, or
                found = has(read(f"{folder}/manifest.json"), _MANIFEST_KEYS)  # a unit it committed, says so
                if not found:
                    try:
                        found = any(_UNIT_DONE.fullmatch(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{folder}/shards",
                                                                                              detail=False))
                    except OSError:
                        found = False
            verdicts[folder, marker] = found
        return verdicts[folder, marker]

    kept: list[str] = []
    dropped: dict[str, set[str]] = {}
    for c in candidates:
        if not c.startswith(root + "/"):
            kept.append(c)
            continue
        parts = c[len(root) + 1:].split("/")
        owner, folder = None, root  # the first folder on the path that wrote the entry the path goes on with
        for part in parts:
            if (marker := _marker_for(part)) and is_output(folder, marker):
                owner = (folder, part)
                break
            folder += "/" + part
        if owner is None:
            kept.append(c)
        elif _readable(parts[-1]):  # what would have been read as prompts (not run.json, the lock, ...)
            dropped.setdefault(owner[0], set()).add(owner[1])
    for folder in sorted(dropped):
        inside = [k for k in kept if k.startswith(folder + "/")]
        if any(_readable(k.rsplit("/", 1)[-1]) for k in inside):
            reason = f"a memaudit output folder: its {', '.join(sorted(dropped[folder]))} skipped, its other files read"
            gone = {f"{folder}/{LOCK_NAME}"}  # the command's lock
        else:
            reason = "a memaudit output folder"
            gone = set(inside)  # nothing in it is read: said once for the folder, not file by file
        skipped.append({"path": _unstrip(fs, folder), "reason": reason})
        kept = [k for k in kept if k not in gone]
    return kept


def _readable(name: str) -> bool:
    """Whether a file named ``name`` is read as prompts when an input folder or glob finds it (not a marker or
    hidden file, a supported format); the rule :func:`discover` applies."""
    return not name.startswith(("_", ".")) and format_of(name) is not None


def _glob_root(path: str) -> str:
    """The fixed part of glob pattern ``path``: its folders before the first one with ``*``, ``?`` or ``[``."""
    parts = path.split("/")
    i = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:i])


def _decoded_glob(fs, path: str) -> list[str]:
    """Matches of glob pattern ``path`` on an http(s) server whose folder listing percent-encodes names
    (``dt%3D2026-12-01/``, ``my%20dir/``): the pattern, as the user writes it (``dt=2026-12-0[12]``), is matched
    against the decoded names; fsspec's glob matches the encoded ones and found nothing. ``[]`` on other file
    systems, or when nothing matches."""
    from urllib.parse import unquote

    from fsspec.utils import glob_translate

    if not path[:8].lower().startswith(("http://", "https://")):
        return []
    pattern = re.compile(glob_translate(unquote(path)))
    root = _glob_root(path)
    while root.count("/") >= 3:  # the fixed part may itself be spelled unlike the listing: list from higher up
        depth = None if "**" in path else path.count("/") - root.count("/")
        try:
            found = fs.find(root, maxdepth=depth, withdirs=True)
        except OSError:
            found = []
        if matches := [p.rstrip("/") for p in found if pattern.match(unquote(p.rstrip("/")))]:
            return matches
        if unquote(root) == root and found:  # a plain fixed part that the server lists: nothing can match
            return []
        root = root.rsplit("/", 1)[0]
    return []


def _glob_files(fs, path: str, root: str, matches: list[str], skipped: list[dict]) -> list[str]:
    """The files that the ``matches`` of glob pattern ``path`` (fixed part ``root``) stand for: a matched file, and
    the files under a matched folder, read as a folder input reads them (:func:`_files_under`), so that
    ``logs/dt=2026-12-0*`` reads those partitions and ``out/*.parquet`` reads a Spark ``table.parquet/`` folder.
    A folder inside another matched one is read once; a hidden or marker folder (``.*``, ``_*``) that a wildcard
    matched is not entered (:func:`_hidden_matches` lists it)."""
    written = set(path.split("/"))
    files, folders = [], []
    for m in matches:
        (folders if fs.isdir(m) else files).append(m.rstrip("/"))
    out = set(files)
    for folder in folders:
        rel = folder[len(root.rstrip("/")) + 1:].split("/") if folder.startswith(root.rstrip("/") + "/") else []
        if any(f.startswith((".", "_")) and f not in written for f in rel):
            out.add(folder + "/" + "_")  # stands for the hidden folder: _hidden_matches skips it and lists it once
        elif not any(folder.startswith(other + "/") for other in folders):
            out.update(_files_under(fs, folder, skipped))
    return sorted(out)


def _hidden_matches(fs, path: str, root: str, matches: list[str], skipped: list[dict]) -> list[str]:
    """``matches`` of glob pattern ``path`` (fixed part ``root``, :func:`_glob_root`) without those inside a folder
    named ``.*`` or ``_*`` (hidden, or a writer's ``_temporary``) that a wildcard matched, as a folder input does not
    enter them (:func:`_files_under`); a folder the pattern names itself (``_staging/*.parquet``) is read. Each
    folder left out is added to ``skipped`` once."""
    root = root.rstrip("/")
    written = set(path.split("/"))
    kept, cuts = [], []
    for m in matches:
        folders = m[len(root) + 1:].split("/")[:-1] if m.startswith(root + "/") else []
        i = next((i for i, f in enumerate(folders) if f.startswith((".", "_")) and f not in written), None)
        if i is None:
            kept.append(m)
        elif (cut := root + "".join("/" + f for f in folders[:i + 1])) not in cuts:
            cuts.append(cut)
    skipped.extend({"path": _unstrip(fs, cut), "reason": "hidden or marker folder"} for cut in cuts)
    return kept


def file_version(url: str) -> str:
    """What identifies a file's content for resuming: its size and modification time (or ETag)."""
    fs, path = _fs(url)
    info = fs.info(path)
    stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created")
                  if info.get(k) is not None), None)
    return f"size={info.get('size')} modified={stamp}"


def file_versions(urls: list[str]) -> list:
    """:func:`file_version` of each of ``urls``, in order, asked by up to :data:`PLAN_THREADS` threads at once (an
    object store answers each in tens of milliseconds: a folder of thousands of small files took minutes one by one);
    an :class:`OSError` stands in the list for a file that cannot be asked (gone: ``FileNotFoundError``). Other errors
    are raised, the first in order."""
    def ask(url: str):
        try:
            return file_version(url)
        except OSError as exc:
            return exc

    return _in_threads(ask, urls, "memaudit-stat")


def _in_threads(fn, items: list, name: str) -> list:
    """``[fn(item) for item in items]``, computed by up to :data:`PLAN_THREADS` threads named ``name`` (the results
    in the items' order; the first exception in that order is raised once all have run)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(PLAN_THREADS, len(items))), thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


def _is_empty(url: str) -> bool:
    """True for a zero-byte file (before any decompression); False when it cannot be told."""
    fs, path = _fs(url)
    try:
        return fs.size(path) == 0
    except OSError:
        return False


def _parquet_file(url: str):
    """An input Parquet file, opened so that its pages' CRC checksums are verified where the writer stored them
    (parquet-mr and Spark do by default; pyarrow with ``write_page_checksum=True``): without it, pyarrow reads a
    flipped byte inside a caption as another caption, which would be scored and ranked as that text. A page that
    fails its checksum is a read error, handled as any damaged page (below); pages without one are read as before."""
    import pyarrow.parquet as pq

    fs, path = _fs(url)
    return pq.ParquetFile(fs.open(path, "rb"), page_checksum_verification=True)


# byte-order marks of the Unicode encodings that are not UTF-8 (UTF-32's first: UTF-32-LE's begins with UTF-16-LE's)
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe", "UTF-16-LE"),
               (b"\xfe\xff", "UTF-16-BE"))


def _check_utf8_text(head: bytes) -> None:
    """Refuse a text input (CSV, JSON lines, .txt; after decompression) whose first bytes ``head`` are a UTF-16 or
    UTF-32 byte-order mark, as SQL Server and Excel write "Unicode" exports: memaudit reads UTF-8, where such a
    file's every other byte is NUL and its line breaks fall inside characters (a one-line JSON-lines file was read
    as two rejected rows, a CSV as a UnicodeDecodeError at byte 0); and one whose first bytes are the signature of
    a compressed or binary format (:data:`_OTHER_MAGICS`: a gzip file named ``prompts.jsonl``, a Parquet file named
    ``.csv``), which would be read as a few rows of binary in place of its prompts.

    Raises:
        ValueError: the file is UTF-16 or UTF-32 text, naming the encoding and how to convert it; or compressed or
            binary data, naming the format and what to do.
    """
    for bom, name in _OTHER_BOMS:
        if head.startswith(bom):
            raise ValueError(f"it is {name} text (it begins with that byte-order mark); memaudit reads UTF-8: convert "
                             f"it, e.g. iconv -f {name[:6]} -t UTF-8")
    for magic, what, fix in _OTHER_MAGICS:
        if re.match(magic, head, re.DOTALL):  # a '.' is any byte: a WebP's size may hold a line feed
            raise ValueError(f"it is {what}, not text (its first bytes are that format's signature): {fix}")


_NOT_PROMPTS = "give memaudit the prompt table, or move the file out of the inputs (or --skip-bad-files)"
# what a text input's first bytes (after any decompression) say it is instead: read as text, a gzip file named
# prompts.jsonl was 2 rejected rows of binary in place of its 10 prompts, and the run exited 0. A compressed
# file is decompressed by its name's suffix (.gz, .zst, .bz2)
_OTHER_MAGICS = ((rb"\x1f\x8b", "gzip-compressed data", "add .gz to its name (prompts.jsonl.gz)"),
                 (rb"\x28\xb5\x2f\xfd", "zstd-compressed data", "add .zst to its name (prompts.jsonl.zst)"),
                 (rb"BZh[1-9]1AY&SY", "bz2-compressed data", "add .bz2 to its name (prompts.jsonl.bz2)"),
                 (rb"\xfd7zXZ\x00", "xz-compressed data", "memaudit does not read xz: recompress it with gzip or zstd"),
                 (rb"PK\x03\x04", "a zip archive (an .xlsx workbook is one)", "unpack it, or export the sheet as CSV"),
                 (rb"PAR1\x15", "a Parquet file", "name it .parquet"),
                 # images, documents and programs saved under a text name (a log folder's stray upload): their
                 # first line was read as a CSV header of junk column names, or their lines as rows of binary
                 (rb"\x89PNG\r\n\x1a\n", "a PNG image", _NOT_PROMPTS),
                 (rb"\xff\xd8\xff", "a JPEG image", _NOT_PROMPTS),
                 (rb"GIF8[79]a", "a GIF image", _NOT_PROMPTS),
                 (rb"RIFF....WEBP", "a WebP image", _NOT_PROMPTS),
                 (rb"%PDF-", "a PDF document", _NOT_PROMPTS),
                 (rb"\x7fELF", "an executable (ELF)", _NOT_PROMPTS))


def _check_line_breaks(head: bytes) -> None:
    """Refuse a .txt or JSON-lines file whose first chunk ``head`` (4 MiB, after any decompression) holds no LF
    but a CR followed by more text: its lines end in a lone CR, as classic Mac OS wrote text. memaudit splits lines
    at LF (CRLF is read), so such a file of 3 prompts was read as one row holding all three, and the run exited 0.
    Also one whose lone CRs followed by more text are at least as many as its LFs (CR lines with an LF line
    appended); a lone CR inside a line of an LF file stays in its prompt.

    Raises:
        ValueError: naming the line breaks and how to convert them.
    """
    if b"\r" not in head:  # (nearly every file: no scan)
        return
    # a lone CR is one followed by more text ("\r\r\n", a CRLF file written again through a text-mode CRLF writer, is
    # no break). A file of CR lines, or of CR lines with an LF line added at its end (`echo ... >> prompts.txt`):
    # 'a red cat\ra blue dog\ra green bird\n' was one row holding all three prompts, and the run exited 0. A lone CR
    # inside a line of an LF file stays in its prompt: refused only where lone CRs are as many as the LFs
    lone = len(re.findall(rb"\r(?=[^\r\n])", head))
    if not lone or lone < (lf := head.count(b"\n")):
        return
    if not lf:
        raise ValueError("its lines end in a lone carriage return (CR, as classic Mac OS wrote text), not LF or CRLF, "
                         "so it would be read as one line: convert it, e.g. tr '\\r' '\\n' < IN > OUT")
    raise ValueError(f"{lone:,} of its line breaks are a lone carriage return (CR, as classic Mac OS wrote text) "
                     f"and {lf:,} LF or CRLF, so the lines ended by CR would be read as one: convert them, e.g. "
                     "tr '\\r' '\\n' < IN > OUT")


def _line_offsets(url: str, unit_rows: int) -> tuple[int, list[int]]:
    """Count lines of a text file; return ``(rows, byte offsets of rows 0, unit_rows, 2*unit_rows, ...)``.

    Raises:
        ValueError: a UTF-16 or UTF-32 file (:func:`_check_utf8_text`, on the first chunk this count reads); one
            whose lines end in a lone CR (:func:`_check_line_breaks`).
    """
    offsets = [0]
    rows = 0
    pos = 0
    last_byte = b"\n"
    with _open(url) as fh:
        while chunk := fh.read(1 << 22):
            if not pos:
                _check_utf8_text(chunk[:16])
                _check_line_breaks(chunk)
            start = 0
            while (nl := chunk.find(b"\n", start)) != -1:
                rows += 1
                if rows % unit_rows == 0:
                    offsets.append(pos + nl + 1)
                start = nl + 1
            pos += len(chunk)
            last_byte = chunk[-1:]
    if last_byte != b"\n":  # last line without a trailing newline
        rows += 1
    if offsets and offsets[-1] >= pos and len(offsets) > 1:
        offsets.pop()
    return rows, offsets


def _csv_names(url: str) -> list[str]:
    """The header of a CSV file, as pyarrow reads it (a leading UTF-8 BOM skipped)."""
    import pyarrow.csv as pacsv

    with _open(url) as fh:
        return pacsv.open_csv(fh, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                              convert_options=pacsv.ConvertOptions(check_utf8=False),
                              parse_options=pacsv.ParseOptions(newlines_in_values=True,
                                                               invalid_row_handler=_skip_row)).schema.names


def _skip_row(row) -> str:
    """pyarrow's ``invalid_row_handler`` that skips the row (only the header is wanted)."""
    return "skip"


def _csv_reader(url: str, names: list[str] | None = None, include: list[str] | None = None, on_invalid=None):
    """A streaming reader of a CSV file with every column read as text, exactly as written: no type inference
    (``007`` stays ``007``, a column of numbers that turns to words later does not fail the file), and only an
    unquoted empty field is null (``NA``, ``null``, ``NaN`` are text; a quoted ``""`` is the empty string).
    ``names``: the header (:func:`_csv_names`, read when not given); ``include``: read only these columns;
    ``on_invalid``: pyarrow's ``invalid_row_handler`` (a row whose fields do not match the header)."""
    import pyarrow.csv as pacsv

    names = _csv_names(url) if names is None else names
    # check_utf8=False: a field with invalid UTF-8 must reject its row (invalid_utf8, in _arrow_batch), not the file
    convert = pacsv.ConvertOptions(check_utf8=False, column_types={n: pa.string() for n in names},
                                   strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=False,
                                   include_columns=include)
    # newlines_in_values: a quoted field may hold line breaks (else a block cut inside one splits its record)
    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid)
    return pacsv.open_csv(_open(url), read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                          convert_options=convert, parse_options=parse)  # a leading BOM is skipped


def _csv_rows(url: str, quoted_empty: bool = False) -> Iterator[list[str]]:
    """Every record of a CSV file, its header first, through Python's csv module, which reads a record whose fields
    do not match the header (pyarrow fails the file on it). Blank lines are skipped, as pyarrow skips them; a
    leading BOM is dropped; bytes that are not UTF-8 are kept as surrogates (``surrogateescape``), so each row can
    be judged alone (:func:`_undecodable`). ``quoted_empty``: a field written as a quoted ``""`` is
    :data:`QUOTED_EMPTY` (Python's csv module reads it as ``""``, as an empty field: :func:`_mark_quoted_empty`)."""
    with _open(url) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
        if not quoted_empty:
            yield from (record for record in csv.reader(text) if record)
            return
        raw: list[str] = []  # the lines of the record being read (the reader takes lines only as a record needs)

        def lines():
            for line in text:
                raw.append(line)
                yield line

        for record in csv.reader(lines()):
            if record and "" in record and '""' in (written := raw[0] if len(raw) == 1 else "".join(raw)):
                record = _mark_quoted_empty(record, written)
            raw.clear()
            if record:
                yield record


# a field of a CSV record as written, and its comma: quoted (a doubled quote is one inside it; text after the closing
# quote joins the field, as the csv module reads it), or not
_CSV_FIELD = re.compile(r'("[^"]*(?:""[^"]*)*"[^,]*|[^,]*)(?:,|\Z)')


class _QuotedEmpty(str):
    """The text of a CSV field written as a quoted ``""`` (:func:`_csv_rows` with ``quoted_empty``)."""


QUOTED_EMPTY = _QuotedEmpty("")


def _mark_quoted_empty(record: list[str], written: str) -> list[str]:
    """``record`` (as Python's csv module read it from the text ``written``) with each empty field that was written
    as a quoted ``""`` made :data:`QUOTED_EMPTY`, so that a CSV file read record by record (one holding a ragged row)
    tells it from an empty field as pyarrow's reader does: a quoted ``""`` is the empty string, an empty field null.
    The fields are found in ``written`` with the csv module's default dialect (comma, double quote, a quote doubled
    inside quotes); a record whose fields cannot be matched so is returned as read.

    A record with no comma inside quotes (nearly every one) has as many fields as commas plus one, each field the
    text between two commas: ``str.split`` finds them, 3.4x cheaper a record than the regular expression, which is
    kept for the others. Measured on 300,000 records each holding a ``""`` and an empty field, read record by record
    (2 shared cores): 3.2 s before, 1.5 s now, 0.7 s without marking any field."""
    line = written.rstrip("\r\n")
    fields = line.split(",")
    if len(fields) != len(record):  # a comma inside quotes (the csv module reads no more fields than commas + 1)
        fields = [m[1] for m in itertools.islice(_CSV_FIELD.finditer(line), len(record))]
        if len(fields) != len(record):
            return record
    return [QUOTED_EMPTY if f == '""' and v == "" else v for f, v in zip(fields, record)]


def _csv_records(url: str) -> Iterator[list[str]]:
    """The records of a CSV file after its header (:func:`_csv_rows`, a quoted ``""`` :data:`QUOTED_EMPTY`), for
    files that hold records whose fields do not match the header (:func:`_read_csv_records`)."""
    records = _csv_rows(url, quoted_empty=True)
    next(records, None)
    yield from records


def _csv_first_rows(url: str, n: int) -> list[list[str]]:
    """The first ``n`` records of a CSV file, its header first (:func:`_csv_rows`); the file is closed after."""
    with contextlib.closing(_csv_rows(url)) as rows:
        return list(itertools.islice(rows, n))


def _plan_csv(url: str, unit_rows: int) -> tuple[list[str], int, list[tuple[int, int, int]], str]:
    """``(header, rows, unit ranges, reader)`` of a CSV file for :func:`plan_units`. Counting parses every record
    but converts one column; a file holding a record whose fields do not match the header (an unquoted comma) is
    read record by record instead (reader ``"csv-records"``, each such row rejected as ``invalid_csv_row``).

    Raises:
        pyarrow.ArrowException, csv.Error, OSError, EOFError, ValueError: the file cannot be read as CSV.
    """
    import pyarrow.csv as pacsv

    def ranges(rows: int) -> list[tuple[int, int, int]]:
        return [(a, min(a + unit_rows, rows), 0) for a in range(0, rows, unit_rows)]

    def by_records(header: list[str] | None = None) -> tuple[list[str], int, list[tuple[int, int, int]], str]:
        header = header if header is not None else (_csv_first_rows(url, 1) or [[]])[0]
        rows, last = 0, None
        for last in _csv_records(url):
            rows += 1
        _check_quotes_close(url, last[-1].encode("utf-8", "surrogateescape") if last else None)
        return header, rows, ranges(rows), "csv-records"

    try:
        with _undecodable_rows_quiet():
            names = _csv_names(url)
    except pa.ArrowInvalid as exc:
        if _ragged_row_error(exc):
            return by_records()
        first = _csv_first_rows(url, 2)
        if len(first) > 1:
            raise
        return (first or [[]])[0], 0, [], "csv"  # a header alone (pyarrow cannot read one without a line break)
    ragged: list = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        ragged.append(row)
        return "skip"

    # the count converts one column: the last one, whose last value is where a quote that never closes ends up
    # (a record with it in an earlier column lacks fields: read by records); a name given twice cannot be chosen
    by_last = not names or names.count(names[-1]) == 1
    last_col = names[-1:] if by_last else names[:1]
    rows, last = 0, None
    try:
        with _undecodable_rows_quiet():
            for b in _csv_reader(url, names, last_col, on_invalid):
                rows += b.num_rows
                if b.num_rows:
                    last = b.column(0)[b.num_rows - 1]
    except pa.ArrowInvalid as exc:
        if not _ragged_row_error(exc):
            raise
        return by_records(names)
    if ragged:
        return by_records(names)
    if by_last:  # (not last_col == names[-1:]: "k,prompt,k" counts by the first k, whose name is the last's too)
        _check_quotes_close(url, last.cast(pa.binary()).as_py() if last is not None and last.is_valid else None)
    elif rows:  # the last column's name is given twice: its values cannot be chosen by name, so the last record's
        for record in _csv_records(url):  # last field is read by Python's csv module (one more parse, for a rare
            last = record  # header), else a quote that never closes there swallowed the records after it silently
        _check_quotes_close(url, last[-1].encode("utf-8", "surrogateescape") if last else None)
    return names, rows, ranges(rows), "csv"


def _check_quotes_close(url: str, last_field: bytes | None) -> None:
    """Refuse a CSV file that ends inside a quoted field (a writer killed in the middle of a quoted prompt, or a
    stray opening quote): the CSV readers close such a field at the end of the file, so every record after the
    quote would be read as text of one prompt and the file as holding fewer rows, silently. ``last_field``: the
    last field of the file's last record, as read (bytes). Only a field holding a line break can have swallowed
    records, and only a quoted one holds a line break; it is closed when the file (its trailing blanks and line
    breaks left out) ends in an odd run of quotes: its closing quote after pairs of escaped ones (``""``).

    Raises:
        ValueError: the field's quote never closes.
    """
    if not last_field or (b"\n" not in last_field and b"\r" not in last_field):
        return
    with _open(url) as fh:
        if fh.seekable() and not _compressed(url):
            size = fh.seek(0, io.SEEK_END)
            fh.seek(max(0, size - (1 << 16)))
            tail = fh.read()
        else:  # a compressed stream: read to its end, keeping the last chunks
            tail = b""
            while chunk := fh.read(1 << 20):
                tail = (tail + chunk)[-(1 << 17):]
    tail = tail.rstrip(b" \t\r\n")
    if (len(tail) - len(tail.rstrip(b'"'))) % 2 == 0:
        lines = last_field.count(b"\n") or last_field.count(b"\r")
        raise ValueError(f"it ends inside a quoted field that never closes: its last {lines:,} line(s) would be read "
                         "as the text of one field (a file cut short, or a stray quote)")


@contextlib.contextmanager
def _undecodable_rows_quiet():
    """Keep the "Exception ignored ... UnicodeDecodeError" that pyarrow prints (``sys.unraisablehook``) when it
    cannot hand a ragged row that is not UTF-8 to an ``invalid_row_handler`` off the terminal: the read then fails,
    and :func:`_ragged_row_error` reads the file record by record. Other unraisable errors go to the hook before."""
    previous = sys.unraisablehook

    def hook(info):
        if not isinstance(info.exc_value, UnicodeDecodeError):
            previous(info)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _ragged_row_error(exc: BaseException) -> bool:
    """Whether pyarrow refused a CSV for a row whose fields do not match the header although an
    ``invalid_row_handler`` was set: it cannot hand such a row to the handler when the row's bytes are not UTF-8
    (it decodes the row's text first, prints the UnicodeDecodeError as "Exception ignored" and fails the read).
    Such a file is read record by record as any file with ragged rows (the row rejected as ``invalid_csv_row``)."""
    return "columns, got" in str(exc)


def _plan_file(f: InputFile, prompt_column: str | tuple[str, ...], unit_rows: int, id_column: str | None,
               keep_columns: tuple[str, ...]) -> tuple[str, list[str], int, list[tuple[int, int, int]]]:
    """One file's part of :func:`plan_units`: ``(the units' reader format, its column names, its rows, its units'
    (start, stop, byte offset))``, reading its footer (Parquet) or its lines (text formats).

    Raises:
        OSError, EOFError, pyarrow.ArrowException, ValueError, UnicodeDecodeError, csv.Error: the file cannot be
            read as its format (:func:`plan_units` skips or refuses it).
    """
    fmt = f.fmt  # the units' reader: a CSV file with ragged rows is read as "csv-records"
    if f.fmt == "parquet":
        pf = _parquet_file(f.url)
        names = pf.schema_arrow.names
        rows = pf.metadata.num_rows
        cuts = [0]
        acc = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            while n > 0:
                take = min(n, unit_rows - acc)
                acc += take
                n -= take
                if acc == unit_rows:
                    cuts.append(cuts[-1] + acc)
                    acc = 0
        if acc:
            cuts.append(cuts[-1] + acc)
        ranges = [(a, b, 0) for a, b in zip(cuts, cuts[1:])]
    elif f.fmt == "txt":
        names = ["prompt"]
        rows, offsets = _line_offsets(f.url, unit_rows)
        ranges = [(i * unit_rows, min((i + 1) * unit_rows, rows), off) for i, off in enumerate(offsets)
                  if i * unit_rows < rows]
    elif f.fmt == "jsonl":
        rows, offsets = _line_offsets(f.url, unit_rows)
        names = _jsonl_columns(f.url, (*prompt_names(prompt_column), id_column, *keep_columns))
        ranges = [(i * unit_rows, min((i + 1) * unit_rows, rows), off) for i, off in enumerate(offsets)
                  if i * unit_rows < rows]
    else:
        with _open(f.url) as fh:  # (pyarrow's CSV reader would fail at byte 0, naming no encoding)
            _check_utf8_text(fh.read(16))
        names, rows, ranges, fmt = _plan_csv(f.url, unit_rows)
    twice = [c for c in dict.fromkeys((*prompt_names(prompt_column), id_column, *keep_columns))
             if c and names.count(c) > 1]
    if twice and f.fmt != "jsonl":  # which of the two would be the prompt (id, kept value)? Neither.
        raise ValueError(f"the column name(s) {', '.join(map(repr, twice))} appear more than once in its "
                         "header")
    return fmt, names, rows, ranges


PLAN_THREADS = 8  # files planned at once: each costs a footer or a read, an object store's latency per file


NAME_NOT_UTF8 = ("its name is not UTF-8 (bytes the file system keeps, which the outputs' source column and prompt ids, "
                 "text, cannot hold); rename it, e.g. convmv -f latin1 -t utf8 --notest")


def locale_hint() -> str:
    """``""``, or where Python's file system encoding is not UTF-8 (a C or POSIX locale with ``PYTHONUTF8=0``, a
    Latin-1 locale) a note that even UTF-8 names then read as bytes that are not text, and how to fix that."""
    import sys

    encoding = sys.getfilesystemencoding().lower().replace("-", "").replace("_", "")
    if encoding == "utf8":
        return ""
    return (f" (this process reads file names as {sys.getfilesystemencoding()}, not UTF-8: run it with "
            "LC_ALL=C.UTF-8 or PYTHONUTF8=1)")


def _name_why(url: str) -> str:
    """Why the file ``url`` (:func:`name_not_utf8`) cannot be named: its bytes are not UTF-8 (:data:`NAME_NOT_UTF8`),
    or they are and this process's locale read them as another encoding (:func:`locale_hint`): renaming a
    correctly named file would not help then."""
    hint = locale_hint()
    try:
        url.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        return NAME_NOT_UTF8 + hint
    return ("its name is not text under this process's locale" + hint) if hint else NAME_NOT_UTF8


def name_not_utf8(url: str) -> str | None:
    """None for a path that is UTF-8 text; for one holding bytes that are not (read as surrogates: a Latin-1 file
    name on Linux), the path with those bytes escaped (``part-\\xff.jsonl``), for the refusal and the manifest."""
    try:
        url.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unlisted_folders(skipped: list[dict]) -> list[dict]:
    """The entries of ``skipped`` (:func:`discover`'s) for folders that could not be listed: their files are
    unknown, so a run refuses them unless ``--skip-bad-files`` (:func:`audit.pipeline.build_plan`)."""
    return [s for s in skipped if s.get("unreadable") and f": {UNLISTED} (" in str(s.get("reason", ""))]


def unlisted_summary(skipped: list[dict]) -> str:
    """The folders of ``skipped`` (:func:`discover`'s) that could not be listed (:func:`unlisted_folders`), in one
    phrase: the first by path with its reason, and how many more (``/proc/1/fdinfo: cannot list the folder
    (Permission denied), and 41 more folders``); "" when there are none. What a run refuses them with
    (:func:`audit.pipeline.build_plan`, with :data:`SKIP_BAD_FILES_HINT`), and :func:`discover` when nothing
    readable was found beside them (with :data:`NOTHING_TO_SKIP_HINT`)."""
    unlisted = sorted(unlisted_folders(skipped), key=lambda s: str(s["path"]))  # the first by name, not walk order
    if not unlisted:
        return ""
    more = f", and {len(unlisted) - 1} more folder{'s' if len(unlisted) > 2 else ''}" if len(unlisted) > 1 else ""
    return f"{unlisted[0]['reason']}{more}"


def plan_units(files: list[InputFile], prompt_column: str | tuple[str, ...], unit_rows: int = 20_000,
               skip_bad_files: bool = False, id_column: str | None = None,
               keep_columns: tuple[str, ...] = ()) -> Plan:
    """Cut files into units of at most ``unit_rows`` rows. ``prompt_column``: one name, or several of which each
    file reads (:func:`prompt_names`).

    Raises:
        SourceError: a file cannot be read (corrupt Parquet, unreadable CSV) or its name is not UTF-8, unless
            ``skip_bad_files``; a file cannot be opened for the process's open-file limit, whatever
            ``skip_bad_files`` says (:func:`audit.faults.files_limit_problem`);
            or no file has the prompt column, the id column or a ``keep_columns`` column (the message lists
            the columns found).
    """
    from audit.faults import files_limit_fix, files_limit_problem

    wanted = prompt_names(prompt_column)
    units: list[Unit] = []
    skipped: list[dict] = []
    file_rows: dict[str, int] = {}
    columns_seen: dict[str, list[str]] = {}
    kept: list[InputFile] = []
    def plan(f: InputFile):
        if name_not_utf8(f.url) is not None:  # refused or skipped below, unread
            return None
        try:
            return _plan_file(f, prompt_column, unit_rows, id_column, keep_columns)
        except (OSError, EOFError, pa.ArrowException, ValueError, UnicodeDecodeError, csv.Error) as exc:
            return exc

    # files are planned by up to PLAN_THREADS threads (a folder of small files on an object store waits on each
    # file's latency, not its bytes), and taken in their order: units, skips and a refusal as one after another
    planned = _in_threads(plan, files, "memaudit-plan")
    for f, result in zip(files, planned):
        if (named := name_not_utf8(f.url)) is not None:
            if skip_bad_files:
                skipped.append({"path": named, "reason": f"{named}: {_name_why(f.url)}", "unreadable": True})
                continue
            raise SourceError(f"{named}: {_name_why(f.url)}{SKIP_BAD_FILES_HINT}")
        if not isinstance(result, Exception):
            fmt, names, rows, ranges = result
        else:
            exc, fmt = result, f.fmt
            if _is_empty(f.url):  # a zero-byte file holds no rows, whatever its format (a writer's placeholder),
                names, rows, ranges = [], 0, []  # and no columns: it must not count as having the prompt column
            else:
                if limit := files_limit_problem(exc):  # the process's limit, not the file: never skipped as bad
                    raise SourceError(f"{f.url}: cannot be opened, {limit} ({error_line(exc)}); "
                                      f"{files_limit_fix(limit)} and rerun the same command") from exc
                msg = f"{f.url}: cannot read as {f.fmt} ({error_line(exc)})"
                if skip_bad_files:
                    skipped.append({"path": f.url, "reason": msg, "unreadable": True})
                    continue
                raise SourceError(msg + SKIP_BAD_FILES_HINT) from exc
        kept.append(f)
        file_rows[f.url] = rows
        columns_seen[f.url] = names
        # a file with a schema lacks the column in every row; a JSON-lines file is decided line by line
        missing = f.fmt in ("parquet", "csv") and first_present(wanted, names) is None
        for a, b, off in ranges:
            units.append(Unit(len(units), f.url, fmt, a, b, off, missing))
    # files whose columns are known (an empty JSONL file, or one of only invalid lines, shows none)
    known = [f for f in kept if f.fmt == "txt" or columns_seen[f.url]]
    if known and all(f.fmt == "txt" for f in known) and wanted != ("prompt",):  # (files with no columns known,
        # a zero-byte one or an empty JSON-lines one, do not make a --prompt-column for the .txt lines right)
        raise SourceError(f"--prompt-column {prompt_column_text(wanted)}: the inputs are .txt files, one prompt a "
                          "line, with no columns; leave --prompt-column out")
    if known and all(f.fmt != "txt" and first_present(wanted, columns_seen[f.url]) is None for f in known):
        cols = sorted({c for names in columns_seen.values() for c in names})
        which = "the prompt column" if len(wanted) == 1 else "any of the prompt columns"
        raise SourceError(f"no input has {which} {', '.join(map(repr, wanted))}; columns found: "
                          f"{_columns_found(cols)}. Choose one with --prompt-column."
                          f"{near_name_note(list(wanted), cols)}{_partition_note(list(wanted), kept)}"
                          f"{_comma_names_note(wanted, cols)}")
    if id_column and known and all(id_column not in columns_seen[f.url] for f in known):
        cols = sorted({c for names in columns_seen.values() for c in names})
        raise SourceError(f"no input has the id column {id_column!r}; columns found: "
                          f"{_columns_found(cols)}. Choose one with --id-column, or leave it out."
                          f"{near_name_note([id_column], cols)}{_partition_note([id_column], kept)}")
    absent = [c for c in keep_columns if known and all(c not in columns_seen[f.url] for f in known)]
    if absent:
        cols = sorted({c for names in columns_seen.values() for c in names})
        raise SourceError(f"no input has the --keep-columns column(s) {', '.join(map(repr, absent))}; columns "
                          f"found: {_columns_found(cols)}.{near_name_note(absent, cols)}"
                          f"{_partition_note(absent, kept)}{_split_name_note(absent, cols, '--keep-columns')}")
    return Plan(kept, units, skipped, file_rows, columns_seen)


# at most this many column names, each cut to this many characters, in a "columns found" list
SHOWN_COLUMNS, SHOWN_NAME_CHARS = 50, 80


def _columns_found(cols: list[str]) -> str:
    """The "columns found" list of the refusals of :func:`plan_units`: at most :data:`SHOWN_COLUMNS` names, each
    cut to :data:`SHOWN_NAME_CHARS` characters, then how many more. A binary file named ``.csv`` (an image, a
    database dump) has its first line read as its header: one of 2 MB without a line break was a 7 MB "one-line"
    error, and a CSV of 10,000 columns listed them all. ``(none)`` when there is none."""
    if not cols:
        return "(none)"
    shown = [c if len(c) <= SHOWN_NAME_CHARS else f"{c[:SHOWN_NAME_CHARS]}... ({len(c):,} characters)"
             for c in cols[:SHOWN_COLUMNS]]
    more = f" and {len(cols) - SHOWN_COLUMNS:,} more" if len(cols) > SHOWN_COLUMNS else ""
    return ", ".join(shown) + more


def _name_key(name: str) -> str:
    """A column name compared loosely: compatibility-normalized (a no-break space is a space), without surrounding
    spaces, case folded."""
    return unicodedata.normalize("NFKC", name).strip().casefold()


def _near_name_difference(wanted: str, found: str) -> str:
    """How the column ``found`` differs from the name ``wanted`` (their :func:`_name_key` is equal): in spaces or case,
    or only in Unicode normalization (``le\\u0301gende``, decomposed as macOS writes text, for ``l\\u00e9gende``),
    which prints the two names alike: then both are written with every character beyond ASCII as a ``\\u`` escape,
    and the file's name as bash's ``printf`` types it."""
    if unicodedata.normalize("NFC", found) == unicodedata.normalize("NFC", wanted):
        form = "decomposed (NFD)" if unicodedata.normalize("NFD", found) == found else "not in composed form (NFC)"
        return (f"the column '{code_points(found)}' differs from '{code_points(wanted)}' only in Unicode "
                f"normalization: the file's name is {form}, and the two print alike (in bash, "
                f"\"$(printf '{code_points(found, printf=True)}')\" types the file's)")
    return f"the column {found!r} differs from {wanted!r} only in spaces or case"


def near_name_note(columns: list[str], found: list[str]) -> str:
    """A sentence for the "no input has the column" refusals naming the columns found that differ from a wanted
    one only in surrounding spaces (a no-break space included) or case (``'image_id '`` in a CSV header, ``Caption``):
    in the list of columns found they read as the name asked for; a dotted name whose first part is a column
    found (``request.prompt``: a struct's field, not a column); and a column found that is a whole header separated
    by ``;``, a tab or ``|`` holding a wanted name (``text;"prompt"``: a spreadsheet's export in a locale whose list
    separator is ``;``, read as one column). ``""`` when there is none."""
    near = [(c, f) for c in columns for f in found if f != c and _name_key(f) == _name_key(c)]
    # a dotted name whose head is a column: a field of a struct column (request.prompt), which no reader here opens
    nested = [(c, h) for c in columns if c not in found and "." in c for h in [c.split(".", 1)[0]] if h in found]
    note = ""
    if near:
        said = "; ".join(_near_name_difference(c, f) for c, f in near)
        note = f" {said[0].upper()}{said[1:]}: give the name exactly as the file has it (quoted), or fix the header."
    for c, head in nested:
        note += (f" {c!r} names a field inside the column {head!r}: memaudit reads top-level columns only; write the "
                 f"field out as a column of its own (polars: df.unnest({head!r}), Spark: select('{c}'))")
        note += "." if not note.endswith(".") else ""
    for f in found:
        for sep, called in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")):
            parts = [p.strip().strip('"').strip() for p in f.split(sep)]
            if len(parts) > 1 and any(c in parts for c in columns):
                note += (f" The column {f!r} is a whole header separated by {called} (a spreadsheet export in a "
                         "locale whose list separator is not a comma?): memaudit reads CSV separated by commas; "
                         "export the file with commas.")
                break
    return note


def _comma_names_note(wanted: tuple[str, ...], found: list[str]) -> str:
    """A sentence for the "no input has the prompt column" refusal when a name given is several joined by commas
    (``--prompt-column prompt,text``, as ``--keep-columns`` takes them) of which one is a column found: a prompt
    column name is taken whole, so the names are given one per ``--prompt-column``. ``""`` otherwise."""
    for c in wanted:
        parts = [p.strip() for p in c.split(",")]
        if len(parts) > 1 and any(p in found for p in parts):
            flags = " ".join(f"--prompt-column {p}" for p in parts if p)
            listed = ", ".join(f'"{p}"' for p in parts if p)
            return (f" {c!r} is taken as one column name: give each name to its own --prompt-column ({flags}; in "
                    f"--config, prompt_column = [{listed}]).")
    return ""


def _split_name_note(absent: list[str], found: list[str], flag: str) -> str:
    """A sentence for the "no input has the --keep-columns column(s)" refusal when a column found holds a comma and
    a missing name is one of its parts: the comma list split it (``--keep-columns a,b`` for a column ``a,b``), and
    such a name is given in double quotes. ``""`` otherwise."""
    for c in found:
        if "," in c and any(a.strip() in c.split(",") for a in absent):
            quoted = '"' + c.replace('"', '""') + '"'
            return f" The column {c!r} holds a comma: name it in double quotes, {flag} '{quoted}'."
    return ""


def _partition_note(columns: list[str], files: list[InputFile]) -> str:
    """A sentence for the "no input has the column" refusals when a missing column is a hive partition key in the
    inputs' folder names (``lang=en/part-0.parquet``, as Spark, polars and pyarrow datasets write them): those
    readers make the key a column, memaudit reads each file's own columns only. ``""`` when none is."""
    folders = {part for f in files for part in f.url.replace("\\", "/").split("/")[:-1]}
    keys = [c for c in columns if any(part.startswith(f"{c}=") for part in folders)]
    if not keys:
        return ""
    what = "is a hive partition key" if len(keys) == 1 else "are hive partition keys"
    return (f" {', '.join(map(repr, keys))} {what} in the inputs' folder names ({keys[0]}=...), not a column of the "
            "files: memaudit reads each file's own columns; the outputs' source column holds each row's file path, "
            f"its partition folders included (`memaudit report RUN --by {keys[0]}` breaks a run down by them).")


def _json_key_pattern(name: str) -> bytes:
    """A bytes regex for ``name`` as a JSON object key, each character as written or as its JSON escape (``p`` or
    ``\\u0070``, any hex case: a writer may escape any of them, ``"\\u0070rompt":``), then the colon."""
    def char(c: str) -> bytes:
        literal = re.escape(json.dumps(c, ensure_ascii=False)[1:-1].encode())
        if ord(c) > 0xFFFF:  # escaped as a surrogate pair: only the literal form is looked for
            return literal
        return b"(?:" + literal + b"|\\\\u(?i:" + f"{ord(c):04x}".encode() + b"))"

    return b'"' + b"".join(char(c) for c in name) + rb'"[ \t]*:'


def _jsonl_columns(url: str, wanted: tuple = (), probe_lines: int = 100) -> list[str]:
    """The keys of a JSON-lines file's objects, for the "no input has the column" refusals only (every line is
    read and judged on its own when the file is scored): the keys of the first ``probe_lines`` objects, plus
    each name of ``wanted`` that is a key of a line's object anywhere in the file (one byte scan for it as a quoted
    key, only for those the probe did not find, each line where it appears read as JSON: a key of a nested object
    is no column), so a key first met after the probe is found."""
    names: dict[str, None] = {}
    with _open(url) as fh:
        for i, line in enumerate(fh):
            if i >= probe_lines:
                break
            if i == 0 and line.startswith(BOM):
                line = line[len(BOM):]
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):  # (nested deeper than Python's json can read: an invalid_json row)
                continue
            if isinstance(obj, dict):
                names.update(dict.fromkeys(obj))
    # a quoted name followed by a colon is a key (a string value equal to the name is not); the line of each match
    # is read as JSON, so that a key of a nested object ({"request": {"prompt": ...}}) is not taken as a column
    look = {c: re.compile(_json_key_pattern(c)) for c in dict.fromkeys(wanted) if c and c not in names}
    if look:
        with _open(url) as fh:
            pending = b""
            while look and (chunk := fh.read(1 << 22)):
                cut = chunk.rfind(b"\n") + 1  # whole lines only: a line cut by the read waits for its end
                block, pending = (pending + chunk[:cut], chunk[cut:]) if cut else (b"", pending + chunk)
                _find_keys(block, look, names)
            if look and pending:
                _find_keys(pending, look, names)
    return list(names)


def _find_keys(block: bytes, look: dict, names: dict) -> None:
    """Move each name of ``look`` (name -> its key pattern) that is a key of a top-level JSON object of a line of
    ``block`` (whole lines) into ``names``."""
    for c, key in list(look.items()):
        checked = 0  # the end of the last line read as JSON: one read a line
        for m in key.finditer(block):
            if m.start() < checked:
                continue
            start, end = block.rfind(b"\n", 0, m.start()) + 1, block.find(b"\n", m.end())
            checked = len(block) if end == -1 else end
            try:
                obj = json.loads(block[start:checked])
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict) and c in obj:
                names[c] = None
                del look[c]
                break


@dataclass
class RowBatch:
    """Rows of a unit as read: ``rows`` (row numbers in the file), raw prompt values (str or other), ids
    (str or None), extra column values, and per-row read errors (reason or None)."""

    rows: list[int]
    prompts: list
    ids: list | None
    extras: dict[str, list]
    errors: list


def read_unit(unit: Unit, prompt_column: str | tuple[str, ...], id_column: str | None = None,
              keep_columns: tuple[str, ...] = ()) -> Iterator[RowBatch]:
    """Stream the rows of a unit in batches of at most 8192 rows. ``prompt_column``: one name, or several of which
    each row reads the first holding a value (:func:`first_filled`)."""
    if unit.missing_column and not (keep_columns or id_column):  # nothing to read from the file: no I/O
        n = unit.rows
        yield RowBatch(list(range(unit.start, unit.stop)), [None] * n, None, {c: [None] * n for c in keep_columns},
                       ["missing_prompt_column"] * n)
        return
    reader = {"parquet": _read_parquet, "txt": _read_txt, "jsonl": _read_jsonl, "csv": _read_csv,
              "csv-records": _read_csv_records}[unit.fmt]
    yield from reader(unit, prompt_names(prompt_column), id_column, keep_columns)


def _arrow_batch(rb, start_row: int, prompt_column: tuple[str, ...], id_column, keep_columns) -> RowBatch:
    """A record batch's rows (Parquet, CSV). With several prompt names each row reads the first that holds a value
    (:func:`holds_value`: not null, not blank), as a JSON line (:func:`first_filled`) and a CSV file read record by
    record do: a writer's old column left ``""`` (or a spreadsheet's quoted ``""``) reads the new one."""
    n = rb.num_rows
    present = [c for c in prompt_column if c in rb.schema.names]
    if not present:  # the file has no prompt column; its kept and id columns are still read
        prompts = [None] * n
        errors = ["missing_prompt_column"] * n
    elif len(present) == 1:
        prompts, errors = _prompt_cells(rb.column(present[0]))
    else:  # several of the names: each row reads the first that holds a value (null in the others), as a JSON line
        cols = [rb.column(c) for c in present]
        cells = [_prompt_cells(c) for c in cols]
        # a cell holds a value when not null and not blank text (a non-text cell's prompt is None: it holds one)
        valid = [[v and (p is None or holds_value(p)) for v, p in zip(c.is_valid().to_pylist(), ck[0])]
                 for c, ck in zip(cols, cells)]
        pick = [next((k for k in range(len(cols)) if valid[k][i]), 0) for i in range(n)]
        prompts = [cells[k][0][i] for i, k in enumerate(pick)]
        errors = [cells[k][1][i] for i, k in enumerate(pick)]
    ids = None
    if id_column is not None and id_column in rb.schema.names:
        ids, bad = text_values(rb.column(id_column)) if is_text(rb.column(id_column).type) else \
            (_kept_text(rb.column(id_column)), [False] * n)  # as a kept column: true, not True; float32 0.1; a NaN
        # or infinite id null (null_id): "nan" would join nothing, and not even polars' text of it, "NaN"
        # a row whose id is not text is rejected as invalid_utf8, unless its prompt already gave it a reason, as a
        # JSON line's and a CSV record's: a file without the prompt column is missing_prompt_column in every row
        errors = [e or ("invalid_utf8" if b else None) for e, b in zip(errors, bad)]
    extras = {}
    for c in keep_columns:
        if c not in rb.schema.names:
            extras[c] = [None] * n
        elif is_text(rb.column(c).type):
            extras[c] = text_values(rb.column(c), lossy=True)[0]
        else:
            extras[c] = _kept_text(rb.column(c))
    return RowBatch(list(range(start_row, start_row + n)), prompts, ids, extras, errors)


def _prompt_cells(col: pa.Array) -> tuple[list, list]:
    """A prompt column's ``(prompts, errors)``, row by row: text as written (``invalid_utf8`` for bytes that are not
    UTF-8, the reject keeping the text with them escaped), a null a null prompt, a value of another type
    ``prompt_not_string:<type>``."""
    n, t = len(col), col.type
    if is_text(t):
        prompts, bad = text_values(col, lossy=True)  # a reject keeps the text, bad bytes escaped
        return prompts, ["invalid_utf8" if b else None for b in bad]
    if pa.types.is_null(t):
        return [None] * n, [None] * n
    # a null of a non-text column is a null prompt, like any other null
    return [None] * n, [f"prompt_not_string:{t}" if valid else None for valid in col.is_valid().to_pylist()]


def _kept_text(col: pa.Array) -> list:
    """A kept column that is not text, as text: a number as Python prints it (``3``, a float32 as its shortest
    float32 form, ``0.1`` rather than ``0.10000000149011612``; a NaN or infinity null), a boolean as JSON writes it
    (``true``, as the JSON-lines reader gives it: Python's ``True`` made the same data differ by input format), a
    list or struct as JSON, a map as a JSON list of ``[key, value]`` pairs (Arrow maps may repeat a key)."""
    t = col.type
    if pa.types.is_boolean(t):
        return [None if v is None else ("true" if v else "false") for v in col.to_pylist()]
    if pa.types.is_floating(t):  # a NaN or infinity is null, as inside a list or struct and in a JSON line
        import numpy as np

        text = str if pa.types.is_float64(t) else lambda v: str(np.float32(v))
        return [None if v is None or not math.isfinite(v) else text(v) for v in col.to_pylist()]
    if pa.types.is_nested(t):
        return [None if v is None else strict_json(v, default=_json_default) for v in col.to_pylist()]
    return [None if v is None else str(v) for v in col.to_pylist()]


def _finite(value):
    """``value`` with every NaN or infinite float inside it (lists, tuples, dicts; numpy floats too, as Python
    floats) replaced by None."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # a numpy scalar: its Python value
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value) -> str:
    """What JSON cannot hold, inside a kept list or struct, as text: bytes as a binary column's value is kept (UTF-8,
    bad bytes escaped: ``ok``, ``\\xff``; Python's ``b'ok'`` made a struct's field differ from the same bytes in a
    column of their own), anything else (a timestamp, a decimal) as Python prints it, as a column of its own."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def strict_json(value, **kw) -> str:
    """``value`` as standard JSON: a NaN or infinite float inside it becomes ``null``, as JavaScript's
    ``JSON.stringify`` writes it (Python's ``json`` writes ``NaN`` and ``Infinity``, which strict readers such as
    polars' ``str.json_decode`` refuse). What a ``default=`` function makes of an object json cannot write (a 0-d
    tensor, a ``Decimal``, through ``default=float``) is made standard too, rather than raising ValueError. Text is
    written as UTF-8 unless ``ensure_ascii=True`` is passed."""
    if (default := kw.pop("default", None)) is not None:
        kw["default"] = lambda obj: _finite(default(obj))
    kw.setdefault("ensure_ascii", False)
    return json.dumps(_finite(value), allow_nan=False, **kw)


def is_text(t: pa.DataType) -> bool:
    """Text columns: string types, and binary ones (Spark and Hive write strings as BYTE_ARRAY without the UTF-8
    annotation), decoded as UTF-8 by :func:`text_values`."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


_AS_BYTES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view(),
             pa.binary(): pa.binary(), pa.large_binary(): pa.large_binary(), pa.binary_view(): pa.binary_view()}


def text_values(col: pa.Array, lossy: bool = False) -> tuple[list, list[bool]]:
    """The values of a text column (string, large_string, string_view or dictionary of them) as Python strings,
    and which rows hold invalid UTF-8 (Parquet and unchecked CSV columns may: pyarrow does not check when it
    writes or reads them). A row with invalid UTF-8 gets None, or with ``lossy`` its text with the bad bytes
    escaped (``\\xff``); the other rows are unaffected. Binary columns are decoded as UTF-8 the same way."""
    values_type = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if _AS_BYTES[values_type] != values_type:  # a string type: to_pylist decodes, fast when every row is valid
        try:
            return col.to_pylist(), [False] * len(col)
        except UnicodeDecodeError:
            pass
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    values, bad = [], []
    for raw in col.view(_AS_BYTES[col.type]).to_pylist():
        if raw is None:
            values.append(None)
            bad.append(False)
            continue
        try:
            values.append(raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(raw.decode("utf-8", "backslashreplace") if lossy else None)
            bad.append(True)
    return values, bad


def _read_parquet(unit: Unit, prompt_column, id_column, keep_columns):
    pf = _parquet_file(unit.url)
    wanted = [c for c in dict.fromkeys([*prompt_column, id_column, *keep_columns]) if c and c in pf.schema_arrow.names]
    # find the row groups overlapping [start, stop)
    groups, first_row, pos = [], None, 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if pos + n > unit.start and pos < unit.stop:
            groups.append(rg)
            if first_row is None:
                first_row = pos
        pos += n
    if not groups:
        return
    batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=wanted)
    yield from _unit_rows(batches, first_row, unit, prompt_column, id_column, keep_columns)


def row_group_ranges(unit: Unit) -> list[tuple[int, int]]:
    """The row ranges ``[start, stop)`` of a Parquet unit's row groups, cut to the unit (one range a group); ``[]``
    for the other formats or when the file's metadata cannot be read."""
    if unit.fmt != "parquet":
        return []
    try:
        meta = _parquet_file(unit.url).metadata
    except (OSError, pa.ArrowException, ValueError):
        return []
    out, pos = [], 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        if pos + n > unit.start and pos < unit.stop and n:
            out.append((max(pos, unit.start), min(pos + n, unit.stop)))
        pos += n
    return out


def _unit_rows(batches, first_row: int, unit: Unit, prompt_column, id_column, keep_columns):
    """The rows ``[unit.start, unit.stop)`` of record ``batches`` whose first row is ``first_row``."""
    row = first_row
    for rb in batches:
        lo, hi = max(unit.start, row), min(unit.stop, row + rb.num_rows)
        if lo < hi:
            yield _arrow_batch(rb.slice(lo - row, hi - lo), lo, prompt_column, id_column, keep_columns)
        row += rb.num_rows
        if row >= unit.stop:
            break


def _compressed(url: str) -> bool:
    """Whether ``url`` names a compressed text file (:data:`COMPRESSIONS`): one that cannot seek, only read on."""
    return os.path.splitext(name_part(url).lower())[1] in COMPRESSIONS


def _read_lines(unit: Unit):
    """``(row, raw line)`` of the unit's rows. An uncompressed file seeks to the unit's byte offset; a compressed
    one cannot (a seek decompresses from byte 0, so reading unit k cost k units: quadratic in the file), and
    continues the stream the previous unit of the file left (:data:`_STREAMS`, key ``(url, "lines")``)."""
    if unit.stop <= unit.start:
        return
    key = (unit.url, "lines")
    state = _take_stream(key) if _compressed(unit.url) else None
    if state is not None and state[1] != unit.start:
        state[0].close()
        state = None
    if state is None:
        fh = _open(unit.url)
        _seek(fh, unit.byte_offset)
    else:
        fh = state[0]
    row, done = unit.start, False
    try:
        for raw in fh:
            if unit.byte_offset == 0 and row == unit.start and raw.startswith(BOM):
                raw = raw[len(BOM):]  # a UTF-8 byte-order mark is not part of the first prompt
            yield row, raw
            row += 1
            if row >= unit.stop:
                break
        done = True
    finally:
        if done and row >= unit.stop and _compressed(unit.url):
            _keep_stream(key, (fh, row))  # the next unit of the file starts here
        else:
            fh.close()


def decode_line(raw: bytes) -> tuple[str, str | None]:
    """``(text, None)``, or for invalid UTF-8 ``(text with the bad bytes escaped, "invalid_utf8")``."""
    try:
        return raw.decode("utf-8").rstrip("\r\n"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace").rstrip("\r\n"), "invalid_utf8"


def _batched(it, size=READ_BATCH_ROWS):
    buf = []
    for item in it:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _read_txt(unit: Unit, prompt_column, id_column, keep_columns):
    for chunk in _batched(_read_lines(unit)):
        rows, prompts, errors = [], [], []
        for row, raw in chunk:
            text, err = decode_line(raw)
            rows.append(row)
            prompts.append(text)
            errors.append(err)
        yield RowBatch(rows, prompts, None, {c: [None] * len(rows) for c in keep_columns}, errors)


def _read_jsonl(unit: Unit, prompt_column, id_column, keep_columns):
    for chunk in _batched(_read_lines(unit)):
        rows, prompts, ids, errors = [], [], [], []
        extras = {c: [] for c in keep_columns}
        for row, raw in chunk:
            text, err = decode_line(raw)
            obj = None
            if err is None and is_blank(text):  # a blank line holds no prompt, as a blank .txt line: not a bad line
                rows.append(row)
                prompts.append(text)
                ids.append(None)
                errors.append("empty_prompt")
                for c in keep_columns:
                    extras[c].append(None)
                continue
            if err is None:
                try:
                    obj = json.loads(text)
                except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's json
                    err = f"invalid_json:{_json_error(exc)}"  # reads ("[" * 100000 is one bad line, not a bad file)
            if err is None and not isinstance(obj, dict):
                err, obj = f"invalid_json:a JSON {_JSON_TYPES.get(type(obj), type(obj).__name__)}, not an object", None
            key = first_filled(prompt_column, obj) if obj else None  # the line's own: first name it has a value for
            value = obj.get(key) if key is not None else None
            if err is not None and err.startswith(("invalid_json", "invalid_utf8")):
                value = text  # the reject row keeps the raw line, so it can be found and fixed
            if err is None and obj is not None and key is None:
                err = "missing_prompt_column"
            elif err is None and value is not None and not isinstance(value, str):
                err, value = f"prompt_not_string:{type(value).__name__}", None
            if err is None and isinstance(value, str) and text_or_escaped(value)[1]:
                # a lone surrogate: the reject keeps the line (JSON escapes), the detail names the escape
                err, value = f"invalid_utf8:{_lone_surrogate('prompt', value)}", text
            if err is None and id_column and obj is not None and id_column not in obj:
                err = "missing_id_column"  # as a line without the prompt key (a present null id is null_id)
            try:
                rid = None if not obj or obj.get(id_column) is None or _nonfinite(obj.get(id_column)) \
                    else _json_text(obj.get(id_column))  # (NaN, Infinity: tokens Python's json reads, no id)
                kept = [None if (v := obj.get(c) if obj else None) is None or _nonfinite(v)
                        else text_or_escaped(_json_text(v))[0] for c in keep_columns]  # NaN: null, as in Parquet
            except RecursionError:  # an id or kept value nested too deep to write as JSON text: the line is a reject
                rid, kept, err, value = None, [None] * len(keep_columns), "invalid_json:nested too deep", text
            if rid is not None:
                rid, bad = text_or_escaped(raw_id := rid)
                if bad and err is None:
                    err = f"invalid_utf8:{_lone_surrogate('id', raw_id)}"
            rows.append(row)
            prompts.append(value)
            ids.append(rid)
            errors.append(err)
            for c, v in zip(keep_columns, kept):
                extras[c].append(v)
        yield RowBatch(rows, prompts, ids if id_column else None, extras, errors)


def _lone_surrogate(what: str, value: str) -> str:
    """The ``detail`` of an ``invalid_utf8`` JSON line whose prompt or id holds a lone surrogate (``"\\ud83d"``: half
    of the UTF-16 pair that JSON escapes an emoji as, a client having cut the text between the two): which escape,
    so that the line is not taken for a file in another encoding."""
    c = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if c is None:
        return ""
    return (f"the {what} holds the JSON escape \\u{ord(c):04x}, half of a UTF-16 surrogate pair without its other "
            "half (an emoji or other character cut in two), which is no character")


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _json_error(exc: BaseException) -> str:
    """Why a line is not JSON, for the ``detail`` column of an ``invalid_json`` reject: Python's message, which
    names the column (``Invalid control character at: line 1 column 18 (char 17)``: a raw tab inside a string,
    invisible in the kept line), or ``nested too deep``. (A blank line is no JSON error: an ``empty_prompt``.)"""
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return str(exc)


def _nonfinite(value) -> bool:
    """True for a float NaN or infinity (an id that is none, as a null)."""
    return isinstance(value, float) and not math.isfinite(value)


def _json_text(value) -> str:
    """A JSON value as text: a string as it is, anything else as JSON (``true``, ``{"a": 1}``, ``1.5``)."""
    if isinstance(value, (dict, list)):
        return strict_json(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# Readers left where a unit ended, so that the next unit of the file continues the stream instead of re-reading
# the file from byte 0 (CSV has no row index to seek to, a compressed file no byte offset): (url, "columns") ->
# (pyarrow reader, first row of `pending`, pending record batch or None); (url, "records") -> (record iterator,
# its next row, header); and a compressed text file's decompressing stream (url, "lines") -> (file object, its next row).
# Engines read a file's units in order, so each byte is read once.
_STREAMS: dict[tuple[str, str], tuple] = {}
_STREAMS_LOCK = threading.Lock()
_STREAMS_KEPT = 4  # open files kept at most (oldest dropped)


def _take_stream(key: tuple[str, str]):
    """The stream state a previous unit left under ``key`` (removed), or None."""
    with _STREAMS_LOCK:
        return _STREAMS.pop(key, None)


def _keep_stream(key: tuple[str, str], state: tuple) -> None:
    """Leave ``state`` for the next unit of the file, dropping the oldest beyond :data:`_STREAMS_KEPT`."""
    with _STREAMS_LOCK:
        _STREAMS[key] = state
        while len(_STREAMS) > _STREAMS_KEPT:
            dropped = _STREAMS.pop(next(iter(_STREAMS)))[0]
            with contextlib.suppress(Exception):  # its file closed now, not whenever it is collected
                dropped.close()


def _read_csv(unit: Unit, prompt_column, id_column, keep_columns):
    """The unit's rows, continuing the stream the previous unit of the file left (:data:`_STREAMS`) when it
    ended at or before ``unit.start``, else from a fresh reader. The record batches, and so the rows, are
    the same either way."""
    key = (unit.url, "columns")
    state = _take_stream(key)
    if state is None or state[1] > unit.start:
        state = (_csv_reader(unit.url), 0, None)
    reader, row, rb = state
    while row < unit.stop:
        if rb is None:
            try:
                rb = reader.read_next_batch()
            except StopIteration:
                return
        lo, hi = max(unit.start, row), min(unit.stop, row + rb.num_rows)
        if lo < hi:
            yield _arrow_batch(rb.slice(lo - row, hi - lo), lo, prompt_column, id_column, keep_columns)
        if row + rb.num_rows > unit.stop:  # the batch holds rows of the next unit: keep it for that unit
            break
        row, rb = row + rb.num_rows, None
    _keep_stream(key, (reader, row, rb))



def _read_csv_records(unit: Unit, prompt_column, id_column, keep_columns):
    """A unit of a CSV file that holds rows whose fields do not match its header (an unquoted comma in a prompt),
    read record by record with Python's csv module (:func:`_csv_records`): such a row is rejected as
    ``invalid_csv_row``, its fields joined by commas as its text; the others are read as pyarrow reads them
    (text as written, an empty field null, a quoted ``""`` the empty string, bytes that are not UTF-8 an
    ``invalid_utf8`` row): a row reads the same whether or not another row of its file is ragged (Python's csv
    module does not tell a quoted ``""`` from an empty field; :func:`_mark_quoted_empty` does). A unit continues the
    record stream the previous unit of the file left (:data:`_STREAMS`), so the file is parsed once when read in
    order."""
    key = (unit.url, "records")  # the stream the previous unit of the file left, as _read_csv keeps it
    state = _take_stream(key)
    if state is None or state[1] > unit.start:
        state = (_csv_records(unit.url), 0, (_csv_first_rows(unit.url, 1) or [[]])[0])
    stream, at, header = state
    col = {name: header.index(name) for name in dict.fromkeys((*prompt_column, id_column, *keep_columns))
           if name and name in header}
    prompt_name = first_present(prompt_column, col)

    def field(record, name):  # a quoted "" is the empty string, an empty field null: as pyarrow's reader reads them
        value = record[col[name]] if name in col else None
        if value is QUOTED_EMPTY:
            return "", False
        return (None, False) if value is None or value == "" else _undecodable(value)

    def records():
        nonlocal at
        while at < unit.stop:
            record = next(stream, None)
            if record is None:
                return
            if at >= unit.start:
                yield at, record
            at += 1

    for chunk in _batched(records()):
        rows, prompts, ids, errors = [], [], [], []
        extras = {c: [] for c in keep_columns}
        for row, record in chunk:
            rows.append(row)
            if len(record) != len(header):
                # in a file without the prompt column every row is missing_prompt_column, as when it is not read at
                # all (no --id-column nor --keep-columns: Unit.missing_column), whatever its fields
                missing = prompt_name is None
                prompts.append(None if missing else _undecodable(",".join(record))[0])
                ids.append(None)
                errors.append("missing_prompt_column" if missing else "invalid_csv_row")
                for c in keep_columns:
                    extras[c].append(None)
                continue
            # several names: the first holding a value (a field not empty nor blank), as the columnar reader reads them
            name = prompt_name if len(prompt_column) == 1 or prompt_name is None else first_filled(
                prompt_column, {c: record[col[c]] for c in prompt_column if c in col})
            prompt, bad = field(record, name)
            rid, bad_id = field(record, id_column) if id_column else (None, False)
            rid = None if bad_id else rid  # as the columnar reader: the row's id is then its file and row
            prompts.append(prompt)
            ids.append(rid)
            errors.append("missing_prompt_column" if prompt_name is None else
                          "invalid_utf8" if bad or bad_id else None)
            for c in keep_columns:
                extras[c].append(field(record, c)[0])
        # a file without the id column gives no ids (missing_id_column), as the columnar reader: not null ids (null_id)
        yield RowBatch(rows, prompts, ids if id_column and id_column in col else None, extras, errors)
    _keep_stream(key, (stream, at, header))


def _undecodable(value: str) -> tuple[str, bool]:
    """``(value, False)``, or for a field read with ``surrogateescape`` that held bytes that are not UTF-8 ``(the
    text with those bytes escaped, True)``: ``b"bad \\xff"`` reads ``"bad \\\\xff"``, as :func:`text_values` writes it."""
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), True
