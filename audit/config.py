"""The run's options: :class:`RunConfig`, the one place they are checked (:func:`validate_config`), and
``memaudit run --config FILE.toml``: every option of ``run`` from a TOML file, command-line flags
overriding the file (one frozen :class:`RunConfig` built from both, as lm-evaluation-harness does).

Owns the options and their checks. Must not import torch, pyarrow or any module that does work (only
:mod:`audit.errors` and the light registries of scorers and engines).

The file holds the options under their ``run`` names, at the top level or in a ``[run]`` table; dashes
and underscores are interchangeable (``keep-columns`` = ``keep_columns``)::

    inputs = ["logs/prompts/"]          # or a single string
    model = "CompVis/stable-diffusion-v1-4"
    out = "audits/nightly/{date}"
    cache = "audits/score-cache"
    keep_columns = ["user", "app"]
    calibration = "{config_dir}/calibration.json"
    fail_on_flagged = 0

String values may use ``{date}`` (today, UTC, ``YYYY-MM-DD``) and ``{config_dir}`` (the folder of the
file); ``out`` also takes ``{time}``, and ``{{``/``}}`` for a brace, as ``--out`` does. Other relative paths are
relative to the working directory, as on the command line. Unknown keys are errors (with a "did you mean").
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
import datetime as dt
import difflib
import os
import re
from pathlib import Path
import tomllib
import types
import typing

from audit.errors import ConfigError, RunError


@dataclass(frozen=True)
class RunConfig:
    """All options of ``memaudit run`` (CLI flags or a TOML file build one); ``memaudit run --help`` explains
    each. Checked by :func:`validate_config`. The ones with units or ranges:

    Attributes:
        prompt_column: the column holding the prompt text, or several names (a tuple) of which each row reads the
            first that holds a value in it (logs whose writer renamed the column).
        batch_size: prompts per forward pass, or ``"auto"`` (the largest that fits free GPU memory; 32 on CPU).
        layers: cross-attention module paths, or None: the model's default layer(s).
        noise_draws: seeded first-step latents per prompt (K); the attention is averaged over them.
        steps: ``num_inference_steps`` of the scorer's scheduler; t0 is its first timestep (981 at 50, SD 1.x).
        unit_rows: input rows per unit of work (the unit of resuming and of a Ray task).
        stall_timeout: seconds without progress before the run fails; None or 0: never.
        confirm_top: a fraction of the distinct prompts (``"0.05"`` or ``"5%"``) or a count (``"500"``).
        max_error_fraction: the fraction in [0, 1] of rows that may fail to score (or lack the prompt or id
            column) before the run ends with :class:`audit.errors.ScoringFailedError` (exit 4).
        fail_on_flagged: a count of rows; more flagged rows (after writing) raise
            :class:`audit.errors.FlaggedPromptsError` (exit 3).
        prepare_threads: host threads that tokenize and draw noise ahead of the device, or ``"auto"``.
    """

    inputs: tuple[str, ...]
    model: str | None = None
    out: str | None = None
    prompt_column: str | tuple[str, ...] = "prompt"  # several names: each row reads the first holding a value
    id_column: str | None = None
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    layers: tuple[str, ...] | None = None
    noise_draws: int = 1
    steps: int = 50  # scheduler steps: the first timestep t0 is scored (981 at 50 for SD 1.x); a score setting
    seed: int = 0
    noise_generator: str = "mt19937"  # mt19937 (host) or philox (drawn on the device): audit.scorers.noise
    limit: int | None = None
    scorer: str = "attention_entropy"
    unit_rows: int = 20_000
    keep_columns: tuple[str, ...] = ()
    skip_bad_files: bool = False
    engine: str = "local"
    workers: int | None = None
    address: str | None = None
    stall_timeout: float | None = 900.0  # seconds without progress before the run fails; None/0: never
    calibration: str | None = None  # calibration.json from `memaudit calibrate`: adds flagged, risk_percentile
    fail_on_flagged: int | None = None  # exit non-zero when more prompts than this are flagged (after writing)
    cache: str | None = None  # score cache folder (audit.cache): prompts seen before are not scored again
    compile: bool = False  # torch.compile the text encoder and UNet (not part of the run identity)
    confirm: str | None = None  # two-stage scoring (audit.cascade): the confirming scorer
    confirm_top: str | None = None  # ...and the top of the ranking it re-scores: a fraction (0.05, 5%) or a count
    max_error_fraction: float = 0.01  # exit non-zero (after writing) when more rows than this could not be scored
    prepare_threads: int | str = "auto"  # threads tokenizing and drawing noise ahead of the device (audit.unit)
    retry_failed: bool = False  # a rerun scores again the finished units holding scoring failures (not identity)

    def __post_init__(self):
        # a column kept twice (--keep-columns app,app) is kept once: two columns of one name made tables that
        # polars and pyarrow refuse to read
        if isinstance(self.keep_columns, (list, tuple)):
            object.__setattr__(self, "keep_columns", tuple(dict.fromkeys(self.keep_columns)))
        # a layer named twice is one layer, as the capture and `memaudit eval --layers` take it: the scorer's mean
        # over the named layers counted it twice (--layers a,a,b weighed a 2/3)
        if isinstance(self.layers, (list, tuple)):
            object.__setattr__(self, "layers", tuple(dict.fromkeys(self.layers)))
        # several prompt column names (logs whose writer renamed the column), each once; one name is kept as a
        # string, so that a run folder made with one --prompt-column keeps its identity
        if isinstance(self.prompt_column, (list, tuple)):
            names = tuple(dict.fromkeys(self.prompt_column))
            object.__setattr__(self, "prompt_column", names[0] if len(names) == 1 else names)

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (tuples as lists), as ``run.json`` and the manifest record them."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d



def _field_kinds() -> dict[str, tuple[type, ...]]:
    """Allowed value types of each RunConfig field (``int | str`` -> ``(int, str)``; tuples as ``tuple``)."""
    hints = typing.get_type_hints(RunConfig)
    kinds = {}
    for f in dataclasses.fields(RunConfig):
        hint = hints[f.name]
        union = isinstance(hint, types.UnionType)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        kinds[f.name] = tuple(tuple if typing.get_origin(a) is tuple else a for a in args)
    return kinds


_FILE_OUT_FIELD = re.compile(r"\{\{|\}\}|\{date\}|\{config_dir\}")


def _expand(value, config_dir: Path, today: str, out: bool = False):
    """``{date}`` and ``{config_dir}`` filled into a config file's string value (and each string of a list). For
    ``out`` (``out=True``), whose braces :func:`expand_out` reads next, ``{{`` and ``}}`` stay escapes (``{{date}}``
    is a folder named ``{date}``, as on the command line) and a brace in the config file's folder name is doubled,
    so that both come out of :func:`expand_out` as the braces they are."""
    if isinstance(value, str):
        if out:
            fields = {"{date}": today, "{config_dir}": str(config_dir).replace("{", "{{").replace("}", "}}")}
            return _FILE_OUT_FIELD.sub(lambda m: fields.get(m.group(), m.group()), value)
        return value.replace("{date}", today).replace("{config_dir}", str(config_dir))
    if isinstance(value, list):
        return [_expand(v, config_dir, today, out) for v in value]
    return value


COMMAND_LINE_ONLY = {  # run options a --config file may not hold (docs/audits.md), and why
    "progress": "the progress display depends on the terminal; give --progress or --no-progress on the command line",
    "dry_run": "a check is asked for on the command line; give --dry-run there",
}


class _TomlFloat(float):
    """A TOML float that keeps the decimal it was written as (``text``, underscores dropped): ``confirm_top =
    1e-500`` is 0.0 as a float, which was refused as ``--confirm-top 0.0`` although the flag's ``1e-500`` (any
    fraction above 0) confirms one prompt; :func:`load_config_file` reads ``confirm_top`` from the text, as the flag's,
    and makes every other one a plain float (so that a message names its type ``float``)."""

    text: str

    @classmethod
    def parse(cls, text: str) -> "_TomlFloat":
        value = cls(text.replace("_", ""))
        value.text = text.replace("_", "")
        return value


def _plain_floats(value):
    """``value`` with every :class:`_TomlFloat` in it (in lists and tables too) a plain float."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [_plain_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_floats(v) for k, v in value.items()}
    return value


def load_config_file(path: str | Path) -> dict:
    """Options of ``run`` from a TOML file, as RunConfig field names and types.

    Raises:
        ConfigError: unreadable TOML, unknown keys, wrong value types, a text value that is empty or blank.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config {path}: no such file")
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder, not a TOML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    try:
        doc = tomllib.loads(text, parse_float=_TomlFloat.parse)
    except tomllib.TOMLDecodeError as exc:
        bare = re.search(r"=\s*(auto|philox|mt19937|local|ray|cpu|cuda\S*|float\d+|bfloat16|\w+_\w+)\s*(#.*)?$",
                         text, re.M)
        hint = "; text values go in quotes (batch_size = \"auto\", engine = \"ray\")" if bare else ""
        raise ConfigError(f"--config {path}: not valid TOML ({exc}){hint}") from None
    if isinstance(doc.get("run"), dict):
        top = {k: v for k, v in doc.items() if k != "run"}
        if both := sorted(set(top) & set(doc["run"])):
            raise ConfigError(f"--config {path}: {', '.join(both)} given both at the top level and in [run]; keep one")
        doc = {**top, **doc["run"]}
    kinds = _field_kinds()
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    out: dict = {}
    spelled: dict[str, str] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name in spelled:  # batch-size and batch_size: one option, two values (the last won)
            raise ConfigError(f"--config {path}: '{spelled[name]}' and '{key}' are one option given twice; keep one")
        spelled[name] = key
        if name in COMMAND_LINE_ONLY:
            raise ConfigError(f"--config {path}: '{key}' is not read from a config file: {COMMAND_LINE_ONLY[name]}")
        if name not in kinds:
            close = difflib.get_close_matches(name, list(kinds), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; options: {', '.join(kinds)}"
            raise ConfigError(f"--config {path}: unknown option '{key}'{hint}")
        if isinstance(value, str) and not value.strip():
            # `cache = ""` (a template's unset variable) ran without the cache, and `calibration = ""` uncalibrated,
            # with no word: '' on the command line drops the file's value, which in the file means nothing
            raise ConfigError(f"--config {path}: '{key}' is empty: give a value, or remove the line for its "
                              "default")
        # confirm_top is read as the decimal written (1e-500 is above 0), as --confirm-top's text is
        value = value.text if name == "confirm_top" and isinstance(value, _TomlFloat) else _plain_floats(value)
        value = _expand(value, path.resolve().parent, today, out=name == "out")
        out[name] = checked_option(name, value, f"--config {path}", key)
    return out


def split_names(text: str) -> tuple[str, ...]:
    """The names in one comma-separated value, read as one CSV record (RFC 4180 quoting): a name holding a comma
    is given in double quotes (``'id,"city, state"'``), ``""`` inside quotes for a quote. Spaces around a name
    are dropped, empty names skipped. The one reading of ``--keep-columns``/``--layers``/``--by``/``--scorers``
    values and of a config file's string ``keep_columns``/``layers``.

    Raises:
        ValueError: quotes that do not close (``'"a,b'``), with the csv module's reason.
    """
    import csv

    try:
        fields = next(csv.reader([text], skipinitialspace=True, strict=True), [])
    except csv.Error as exc:
        raise ValueError(f"{exc}, reading it as comma-separated names (a name holding a comma is given in double "
                         "quotes: 'a,\"b,c\"')") from None
    return tuple(x.strip() for x in fields if x.strip())


# what a comma-separated option names, for the refusal of a value that names nothing (no_names_line)
LIST_NOUNS = {"--by": "column", "--keep-columns": "column", "keep_columns": "column", "--layers": "layer",
              "layers": "layer", "--scorers": "scorer"}


def no_names_line(label: str, value: str) -> str:
    """The refusal of a comma-separated value that names nothing (``--by ''``, ``--keep-columns "$COLS"`` with COLS
    unset, ``' , '``): it was read as no names at all, so the report had no breakdown and the run kept no column,
    in silence. ``label``: the option (``--by``) or a config file's key, named with the value as given."""
    noun = LIST_NOUNS.get(label, "name")
    quoted = " (a name holding a comma in double quotes)" if noun == "column" else ""
    return f"{label} '{value}' names no {noun}: give {noun} names, comma separated{quoted}, or leave {label} out"


def checked_option(name: str, value, where: str, key: str | None = None):
    """``value`` of the RunConfig field ``name``, checked against the field's type and converted: a list (or, for
    ``layers``/``keep_columns``, a comma-separated string, read by :func:`split_names`) to a tuple of strings, an
    int to a float, a path to its string, a ``stall_timeout`` of 0 to None (never). ``where`` and ``key`` name the
    option in the message (``--config FILE``, ``audit.run()``).

    Raises:
        ConfigError: a value of another type (``seed="x"``, ``compile="no"``, ``limit=1.5``); None where the
            option has no None.
    """
    key = key or name
    allowed = _field_kinds()[name]
    kind = allowed[0]
    if value is None:
        if type(None) in typing.get_args(typing.get_type_hints(RunConfig)[name]):
            return None
        raise ConfigError(f"{where}: '{key}' must be {' or '.join(a.__name__ for a in allowed)}, not None")
    if isinstance(value, os.PathLike) and str in allowed:
        value = os.fspath(value)
    if name == "prompt_column" and isinstance(value, (list, tuple)):  # several names, read row by row
        if not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a string or a non-empty list of strings")
        return tuple(value)
    if name == "confirm_top" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a count (500) or a fraction (0.05), as the flag's text
    if kind is tuple:
        if isinstance(value, str):
            if name in ("layers", "keep_columns"):
                try:
                    names = list(split_names(value))
                except ValueError as exc:
                    raise ConfigError(f"{where}: '{key}' {value!r}: {exc}") from None
                if not names:  # ' , ': none, in silence (a list, [], says none on purpose)
                    raise ConfigError(f"{where}: {no_names_line(key, value)}")
                value = names
            else:
                value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a string or a list of strings")
        return tuple(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number")
        if name == "stall_timeout" and value == 0:  # 0: never (as --stall-timeout 0), not a zero-second timeout
            return None
        return float(value)
    if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
        names = " or ".join(a.__name__ for a in allowed)
        raise ConfigError(f"{where}: '{key}' must be {names}, not {type(value).__name__}")
    return value


CLEARABLE = ("cache", "calibration", "confirm")  # '' on the command line runs without the --config file's value


def build_run_config(cli_values: dict, given: set[str], config_file: str | Path | None = None,
                     cleared: dict | None = None) -> RunConfig:
    """Merge a config file with command-line values: a flag given on the command line wins.

    Args:
        cli_values: every RunConfig field as the command line parsed it (defaults included).
        given: names of the fields set explicitly on the command line.
        config_file: the ``--config`` TOML file, if any.
        cleared: filled, when given, with the config file's values that the command line dropped: a
            :data:`CLEARABLE` option given as ``''`` (``--cache ''``) -> the file's value, and ``fail_on_flagged``
            -> the file's gate that ``--calibration ''`` dropped with the calibration, ``confirm_top`` -> the share
            that ``--confirm ''`` dropped with the confirming scorer; ``run --dry-run`` says them.

    Raises:
        ConfigError: a bad file, or no inputs from either place.
    """
    values = dict(cli_values)
    from_file: dict = {}
    if config_file is not None:
        from_file = load_config_file(config_file)
        for name, value in from_file.items():
            if name not in given:
                values[name] = value
    dropped = {name: from_file[name] for name in CLEARABLE
               if name in given and not cli_values.get(name) and from_file.get(name)}
    if "calibration" in given and not values.get("calibration") and "fail_on_flagged" not in given:
        if "calibration" in dropped and values.get("fail_on_flagged") is not None:
            dropped["fail_on_flagged"] = values["fail_on_flagged"]
        values["fail_on_flagged"] = None  # --calibration '' drops the file's calibration, and so its gate on flags
    if "confirm" in given and not values.get("confirm") and "confirm_top" not in given:
        # --confirm '' drops the file's confirming scorer, and so its share of the ranking to confirm (which was
        # refused alone: "--confirm-top needs --confirm SCORER", so that '' could not drop a cascade at all)
        if "confirm" in dropped and values.get("confirm_top") is not None:
            dropped["confirm_top"] = values["confirm_top"]
        values["confirm_top"] = None
    if cleared is not None:
        cleared.update(dropped)
    if not values.get("inputs"):
        raise ConfigError("no inputs: pass prompt tables on the command line or 'inputs' in --config")
    values["inputs"] = tuple(values["inputs"])
    return RunConfig(**values)


def run_config(ctx, config_file, cli_values: dict, cleared: dict | None = None) -> RunConfig:
    """Build the run's RunConfig from typer's context (which flags were given) and ``--config``; ``cleared`` as
    :func:`build_run_config` fills it."""
    given = set()
    for name in cli_values:  # by name: typer may vendor its own click, with its own ParameterSource enum
        source = ctx.get_parameter_source(name)
        if source is not None and getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return build_run_config(cli_values, given, config_file, cleared)


def device_dtype_problem(device: str, dtype: str) -> str | None:
    """Why ``--device`` / ``--dtype`` are not names memaudit knows (one line), or None. Shared by every command
    that loads a model, before it loads one."""
    from audit.models.base import device_name_problem

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        return f"--dtype {dtype}: choose auto, float32, float16 or bfloat16"
    return device_name_problem(device)


MAX_NOISE_DRAWS = 1024  # each draw is one more UNet row per prompt: a bound against a typo, far above any use
MAX_SEEDS = 1024  # generate's images per prompt, in one pipeline call: a bound against a typo (10**20 filled memory)
MAX_BATCH_SIZE = 65_536  # every batch is padded to --batch-size (one kernel shape; lowered to a unit's rows)


_OUT_FIELD = re.compile(r"\{\{|\}\}|\{date\}|\{time\}|[{}]")


def expand_out(template: str, now: dt.datetime | None = None) -> str:
    """``--out`` with ``{date}`` (UTC ``YYYY-MM-DD``) and ``{time}`` (UTC ``HHMMSS``) filled in, so a scheduled
    audit gets a folder per run (``runs/{date}``) or per invocation (``runs/{date}-{time}``); ``{{`` and ``}}``
    are a brace of the folder's name.

    Raises:
        ConfigError: another brace (``{Date}``, ``{date``: a typo would otherwise give every night one folder
            named after it, each run resuming the last).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    fields = {"{date}": now.strftime("%Y-%m-%d"), "{time}": now.strftime("%H%M%S"), "{{": "{", "}}": "}"}

    def fill(m: re.Match) -> str:
        if m.group() in fields:
            return fields[m.group()]
        near = template[max(m.start() - 8, 0):m.start() + 9]
        raise ConfigError(f"--out {template}: a brace that is not {{date}} or {{time}} (near '{near}'); --out "
                          "expands {date} and {time} (UTC), and {{ and }} are a brace in the folder's name")

    # the fields first, then ~: a brace in the home folder's name is not a field, and the context of a bad brace is
    # quoted from the template as given
    return os.path.expanduser(_OUT_FIELD.sub(fill, template))


def check_cache_apart(cache: str, out, out_label: str) -> None:
    """Refuse a score cache that is the run folder ``out``, inside it, or around it (links resolved).

    Raises:
        RunError: naming both.
        ValueError: ``cache`` is a URL (:func:`audit.cache.cache_dir`; :func:`validate_config` checks it first).
    """
    from audit.cache import cache_dir

    root, out = cache_dir(cache).resolve(), Path(out).resolve()
    if out == root or root in out.parents or out in root.parents:
        raise RunError(f"--cache {cache} and {out_label}: give the score cache a folder of its own, neither the run "
                       "folder nor inside it (nor the run inside the cache)")


def check_folder_creatable(out: Path, what: str) -> None:
    """Fail at once when the folder ``out`` (``--out``, ``--cache``) cannot be made or written in: a file on its
    path, a link to nothing, a name longer than the file system takes, a parent without write permission (the run
    folder is made only after the model has loaded), or an existing ``out`` without it (its lock was taken, and
    refused, only after the model had loaded); or ``out`` is a file.

    Raises:
        RunError: naming ``what`` (the option as given) and the cause.
    """
    out = out.absolute()
    if long := [p for p in out.parts if len(os.fsencode(p)) > 255]:
        raise RunError(f"{what}: the name {long[0][:40]}... is longer than 255 bytes, more than a file system takes")
    for q in (out, *out.parents):
        if q.is_symlink() and not q.exists():
            raise RunError(f"{what}: {q} is a link whose target does not exist (or a loop of links)")
    existing = next(q for q in (out, *out.parents) if q.exists())
    if not existing.is_dir():
        raise RunError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # the folder itself too: a rerun writes its lock and tables there
        # a read-only mount is said as such: "no write permission" sent users to chmod and chown, which were right
        why = "on a read-only file system" if _read_only_mount(existing) else "no write permission"
        raise RunError(f"{what}: cannot make a folder in {existing} ({why})" if existing != out else
                       f"{what}: cannot write in {out} ({why})")


def _read_only_mount(folder: Path) -> bool:
    """Whether ``folder`` is on a file system mounted read-only (``statvfs``'s ``ST_RDONLY``)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (not POSIX), or the folder vanished
        return False


def validate_config(cfg: RunConfig) -> None:
    """Check every option that needs no input or model, so that a typo fails at once, in one line.

    Raises:
        RunError: naming the option and what it accepts.
    """
    from audit.engines import ENGINES, missing_requirement
    from audit.scorers import get_scorer

    if cfg.engine not in ENGINES:
        raise RunError(f"--engine {cfg.engine}: choose one of {', '.join(ENGINES)}")
    if problem := missing_requirement(cfg.engine):  # a minimal install, without the [ray] extra
        raise RunError(problem)
    names = (cfg.prompt_column,) if isinstance(cfg.prompt_column, str) else cfg.prompt_column
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise RunError("--prompt-column: give a column name (again for files that name the column otherwise: "
                       "--prompt-column prompt --prompt-column text)")
    if cfg.id_column is not None and not (isinstance(cfg.id_column, str) and cfg.id_column.strip()):
        # `--id-column "$ID"` with ID unset was taken as no --id-column: the rows got '<source>#<row>' ids, silently
        raise RunError(f"--id-column {cfg.id_column!r}: give a column name, or leave the option out for "
                       "'<source>#<row>' ids")
    get_scorer(cfg.scorer)  # RunError naming the scorers, with a did-you-mean
    from audit.scorers import ON_IMPORT

    if cfg.scorer not in ON_IMPORT:  # registered by a register() call in this process only
        import importlib

        if not importlib.import_module(ENGINES[cfg.engine]).IN_PROCESS:
            raise RunError(f"--scorer {cfg.scorer} was registered by a register() call in this process, which the "
                           f"--engine {cfg.engine} workers do not run (they would not know it): add its module to "
                           "audit.scorers.BUILTIN (`memaudit docs architecture`, 'How to add a scorer'), or use "
                           "--engine local")
    from audit.cascade import check_confirm_options

    check_confirm_options(cfg)
    if problem := device_dtype_problem(cfg.device, cfg.dtype):
        raise RunError(problem)
    for flag, value in (("--batch-size", cfg.batch_size), ("--prepare-threads", cfg.prepare_threads)):
        if isinstance(value, str) and value != "auto" and value.strip().isdigit():  # batch_size = "64" in TOML
            raise RunError(f"{flag} {value!r}: a number in quotes is text; write {value.strip()} without quotes "
                           "(or \"auto\" in quotes)")
    if cfg.prepare_threads != "auto" and (not isinstance(cfg.prepare_threads, int) or cfg.prepare_threads < 0):
        raise RunError(f"--prepare-threads {cfg.prepare_threads}: give 0 (in the scoring thread), a positive "
                       "integer or auto")
    from audit.scorers.noise import NOISE_GENERATORS

    if cfg.noise_generator not in NOISE_GENERATORS:
        raise RunError(f"--noise-generator {cfg.noise_generator!r}: choose {' or '.join(NOISE_GENERATORS)}")
    if not 1 <= cfg.noise_draws <= MAX_NOISE_DRAWS:
        raise RunError(f"--noise-draws {cfg.noise_draws}: give 1 to {MAX_NOISE_DRAWS:,} (each draw is one more UNet "
                       "row per prompt: K draws cost K times one)")
    if cfg.steps < 1:
        raise RunError("--steps must be at least 1")
    from audit.scorers.registry import steps_problem

    for name in dict.fromkeys(n for n in (cfg.scorer, cfg.confirm) if n):  # the screening and confirming scorers
        if problem := steps_problem(get_scorer(name), cfg.steps):
            raise RunError(problem)
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool)
                                     or not 1 <= cfg.batch_size <= MAX_BATCH_SIZE):
        raise RunError(f"--batch-size {cfg.batch_size!r}: give an integer from 1 to {MAX_BATCH_SIZE:,} (short batches "
                       "are padded to it, up to the rows there are), or auto")
    if cfg.unit_rows < 1:
        raise RunError("--unit-rows must be at least 1")
    if cfg.limit is not None and cfg.limit < 0:
        raise RunError("--limit must be 0 or more")
    if cfg.stall_timeout is not None and not (0 <= cfg.stall_timeout < float("inf")):  # NaN fails too
        raise RunError(f"--stall-timeout {cfg.stall_timeout}: give 0 (never) or a finite number of seconds")
    if cfg.workers is not None and cfg.workers < 1:
        raise RunError("--workers must be at least 1")
    if not 0 <= cfg.max_error_fraction <= 1:
        raise RunError(f"--max-error-fraction {cfg.max_error_fraction}: give a fraction from 0 to 1 (0.01 = 1%)")
    if cfg.layers is not None and not all(cfg.layers):
        raise RunError("--layers: give cross-attention module paths, comma separated")
    if cfg.out is not None and not str(cfg.out).strip():
        raise RunError("--out is empty: give a folder (or leave it out for a new dated folder)")
    if cfg.model is not None and not str(cfg.model).strip():  # `--model "$MODEL"` with MODEL unset: not the cwd
        from audit.errors import EMPTY_MODEL

        raise RunError(EMPTY_MODEL)
    if cfg.out:
        out = Path(expand_out(str(cfg.out)))
        from audit.cache import not_writable

        # a run folder on a read-only mount: a rerun of a finished run writes nothing there, and one that must write
        # is refused saying why, once the folder's run is compared (audit.runner.read_only_rerun_needs)
        if not (not_writable(out) and (out / "run.json").is_file() and os.access(out, os.R_OK | os.X_OK)):
            check_folder_creatable(out, f"--out {cfg.out}")
    if cfg.cache:
        from audit.cache import cache_dir

        try:
            root = cache_dir(cfg.cache).absolute()
        except ValueError as exc:
            raise RunError(str(exc)) from None
        from audit.sources import name_not_utf8, locale_hint

        if (shown := name_not_utf8(str(root))) is not None:  # pyarrow writes and reads UTF-8 paths only: every
            # unit failed 3 times with "UnicodeEncodeError: ... surrogates not allowed" and the run exited 2
            raise RunError(f"--cache {name_not_utf8(str(cfg.cache)) or shown}: its name is not UTF-8 text"
                           f"{locale_hint()}; choose another --cache")
        from audit.cache import not_writable

        # a team's filled cache on a read-only mount (or not this job's to write): used for lookups only, its scores
        # served and new ones not stored (audit.cache.ScoreCache.read_only); one it cannot even read is refused
        if not (not_writable(root) and os.access(root, os.R_OK | os.X_OK)):
            check_folder_creatable(root, f"--cache {cfg.cache}")
        if cfg.out:
            check_cache_apart(cfg.cache, Path(expand_out(str(cfg.out))), f"--out {cfg.out}")
        from audit.sources import GENERATE_FILES, RUN_FILES

        # another run's (or generate's) output folder, or a folder inside one (`--cache runs/2026-12-01`, the --out
        # of last night's run given for the cache): the cache's folders were written into that run in silence
        for folder in (root, *root.parents):
            if owner := next((f[0] for f in (RUN_FILES, GENERATE_FILES) if (folder / f[0]).is_file()), None):
                raise RunError(f"--cache {cfg.cache}: {'is' if folder == root else 'is inside'} the output folder of "
                               f"another memaudit command ({folder}, with {owner}); give the score cache a folder of "
                               "its own (a new or empty folder, or a cache made before)")
    if cfg.keep_columns:
        from audit.tables import schema_fields

        ours = {f["name"] for name in ("risk", "rejects") for f in schema_fields(name)}
        if clash := [c for c in cfg.keep_columns if c in ours]:
            note = (" (their source column holds each row's input file path, so a hive partition folder such as "
                    "source=laion/ is in it already)" if "source" in clash else "")
            raise RunError(f"--keep-columns {', '.join(clash)}: memaudit's output tables have a column of that "
                           f"name; rename the input column (or keep another one){note}")
