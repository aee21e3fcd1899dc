"""The scorer registry: what each scorer is, needs and writes (the lm-evaluation-harness pattern).

Owns :class:`ScorerSpec` (name, the forward it needs, the columns it writes with their Arrow types,
higher-is-riskier, cost in UNet forwards, its ``compute`` function), the registry and the derivation of
the score columns that the shards, the cache and ``risk.parquet`` hold (:func:`score_columns`, the one
place they are listed). Must not import torch, pyarrow or any other ``audit`` module but
:mod:`audit.errors`: the CLI, the schemas and the config check read it without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import difflib
import re

from audit.errors import RunError

# the UNet work a scorer needs (its cost is counted in UNet forwards per prompt and noise draw)
FORWARDS = {
    "partial_conditional": "one conditional UNet forward stopped after the last selected layer",
    "full_conditional_unconditional": "a full conditional and a full unconditional UNet forward",
    "several_timesteps": "UNet forwards at several timesteps",
    "full_sampling": "a whole sampling loop",
}


@dataclass(frozen=True)
class Column:
    """A score column: ``name``, Arrow ``type`` as ``schemas/*.json`` spell it ("double", "int32", ...), and a
    one-line ``description`` with its units and source."""

    name: str
    type: str
    description: str


# a scorer's and a column's name: a --scorer value, an item of --scorers a,b, a Parquet column and a JSON key
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
NAME_RULE = "give a letter then letters, digits or underscores (at most 64 characters)"
# the columns a risk table has besides the score columns (schemas/risk.json) and what score_prompts returns with them
TABLE_COLUMNS = frozenset({"rank", "prompt_id", "prompt", "prompt_raw", "trigger_tokens", "n_tokens", "truncated",
                           "source", "row", "prompt_hash", "flagged", "risk_percentile", "nonfinite", "n_kept",
                           "token_mass", "reason", "detail"})


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer.

    Attributes:
        name: the ``--scorer`` value.
        description: one line, with the source of the formula.
        forward: a key of :data:`FORWARDS`.
        compute: ``compute(ctx) -> {column: float64 tensor [B]}`` for each of ``columns``, on the device,
            from an :class:`audit.scorers.base.ForwardContext`; no host synchronization. None when the
            scorer adds no column.
        risk_column: the column (one of ``columns``, or ``attn_entropy``) whose value is the risk.
        columns: the columns this scorer adds to every risk table (null in runs of other scorers).
        higher_is_riskier: False negates ``risk_column`` into ``risk`` (risk is always higher = riskier).
        unet_forwards: cost in UNet forwards per prompt and noise draw (a partial forward counts 1).
        scheduler: ``"family"``: the scheduler the model's family builds
            (:meth:`audit.models.base.ModelAdapter.scheduler`); ``"ddim"``: DDIM from the model's scheduler
            configuration whatever its class, for a method whose reference code samples so
            (:func:`audit.scorers.base.scorer_scheduler`).
        check: ``check(model, family)`` raises :class:`audit.errors.ModelError` when the scorer is not defined
            for a loaded ``model`` of adapter ``family`` (called by :class:`audit.scorers.Scorer` before any
            prompt is scored); None: defined wherever the family's adapter allows the forward.
        min_steps: the fewest scheduler steps (``--steps``) the scorer is defined for (guidance_geometry reads
            ``timesteps[-3]``: 3); fewer are refused before anything is scored.

    Raises:
        ValueError: at construction: ``forward`` is not a key of :data:`FORWARDS`, or ``scheduler`` is neither
            ``"family"`` nor ``"ddim"``; a ``name`` or column name that is not a :data:`NAME_PATTERN` name (empty,
            with a comma, space or slash: ``--scorers a,b`` and file paths would split or misread it); a column
            named twice or named as a column every risk table has (``prompt``, ``rank``, ...); a column type other
            than ``"double"`` (the shards and the score cache hold float64 only); a ``risk_column`` that is
            neither one of ``columns`` nor ``attn_entropy``; ``columns`` without a ``compute``; ``unet_forwards``
            not a positive number, ``min_steps`` not a whole number from 1.
    """

    name: str
    description: str
    forward: str
    compute: Callable | None
    risk_column: str
    columns: tuple[Column, ...] = ()
    higher_is_riskier: bool = True
    unet_forwards: float = 1.0
    scheduler: str = "family"
    check: Callable | None = None
    min_steps: int = 1

    def __post_init__(self):
        if self.forward not in FORWARDS:
            raise ValueError(f"scorer {self.name}: forward {self.forward!r} is not one of {', '.join(FORWARDS)}")
        if self.scheduler not in ("family", "ddim"):
            raise ValueError(f"scorer {self.name}: scheduler {self.scheduler!r} is not 'family' or 'ddim'")
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"scorer name {self.name!r}: {NAME_RULE}")
        names = [c.name for c in self.columns]
        for c in self.columns:
            if not isinstance(c, Column) or not isinstance(c.name, str) or not NAME_PATTERN.fullmatch(c.name):
                raise ValueError(f"scorer {self.name}: column {getattr(c, 'name', c)!r}: {NAME_RULE}")
            if c.type != "double":
                raise ValueError(f"scorer {self.name}: column {c.name} has type {c.type!r}; a score column is "
                                 "'double' (the shards and the score cache hold float64 values only)")
            if c.name in TABLE_COLUMNS:
                raise ValueError(f"scorer {self.name}: column {c.name} is a column every risk table already has")
            if names.count(c.name) > 1:
                raise ValueError(f"scorer {self.name}: column {c.name} is named twice")
        if self.risk_column not in (*names, "attn_entropy"):
            raise ValueError(f"scorer {self.name}: risk_column {self.risk_column!r} is neither one of its columns "
                             f"({', '.join(names) or 'none'}) nor attn_entropy")
        if self.columns and self.compute is None:
            raise ValueError(f"scorer {self.name}: columns {', '.join(names)} but no compute to fill them")
        if isinstance(self.unet_forwards, bool) or not isinstance(self.unet_forwards, (int, float)) \
                or not self.unet_forwards > 0:
            raise ValueError(f"scorer {self.name}: unet_forwards {self.unet_forwards!r} is not a positive number")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError(f"scorer {self.name}: min_steps {self.min_steps!r} is not a whole number from 1")


# what every scorer writes: the risk, and the attention of the captured forward (trigger tokens come from it)
RISK_COLUMN = Column("risk", "double", "the score of the chosen scorer; higher = riskier")
CAPTURE_COLUMNS = (
    Column("attn_entropy", "double", "cross-attention entropy, nats (Ren et al. 2024)"),
    Column("bos_mass", "double", "attention probability on the BOS token, a_0"),
)

# what every scorer with a FULL conditional forward writes at no extra forward: the entropy and BOS mass of
# each cross-attention layer, by index in call order (null after a partial forward, and past the model's
# last layer). One scalar column per index: the shards and the score cache hold float64 columns only.
MAX_LAYER_COLUMNS = 16  # SD 1.x and 2.x have 16 cross-attention layers; more are not written (SDXL: 70)
LAYER_COLUMNS = tuple(
    Column(f"{kind}_l{i:02d}", "double", f"{what} of cross-attention layer {i} in call order (full-forward "
           "scorers only; null otherwise)")
    for kind, what in (("attn_entropy", "attention entropy, nats,"), ("bos_mass", "BOS mass"))
    for i in range(MAX_LAYER_COLUMNS))


def steps_problem(spec: ScorerSpec, steps) -> str | None:
    """Why ``spec`` cannot run with ``steps`` scheduler steps (one line naming ``--steps``), or None."""
    if isinstance(steps, int) and steps < spec.min_steps:
        return (f"--steps {steps}: {spec.name} needs at least {spec.min_steps} scheduler steps (every prompt "
                "would fail to score)")
    return None


SCORERS: dict[str, ScorerSpec] = {}


def register(spec: ScorerSpec, replace: bool = False) -> ScorerSpec:
    """Add ``spec`` to :data:`SCORERS`; returns it. Registering the same scorer again (the same spec, or one whose
    ``compute`` is the same module's function of the same name: a reloaded module) replaces it; another scorer under
    a registered name is refused unless ``replace`` (it would take over that name's cache entries, calibrations and
    resumable runs, which are keyed by the name).

    Raises:
        ValueError: ``spec`` is not a :class:`ScorerSpec`; its name is taken by another scorer (without
            ``replace``); one of its columns is already written by the risk table's common columns or by
            another registered scorer.
    """
    if not isinstance(spec, ScorerSpec):
        raise ValueError(f"register() takes a ScorerSpec, not {type(spec).__name__}")
    old = SCORERS.get(spec.name)
    if old is not None and not replace and not _same_scorer(old, spec):
        raise ValueError(f"scorer {spec.name} is already registered ({_origin(old)}): give yours another name, "
                         f"or unregister({spec.name!r}) first")
    taken = {c.name for c in (RISK_COLUMN, *CAPTURE_COLUMNS, *LAYER_COLUMNS)}
    taken |= {c.name for s in SCORERS.values() if s.name != spec.name for c in s.columns}
    clash = [c.name for c in spec.columns if c.name in taken]
    if clash:
        raise ValueError(f"scorer {spec.name}: columns {', '.join(clash)} are already written by another scorer")
    SCORERS[spec.name] = spec
    return spec


def _origin(spec: ScorerSpec) -> str:
    fn = spec.compute
    return f"compute {fn.__module__}.{fn.__qualname__}" if fn is not None and hasattr(fn, "__qualname__") else \
        f"{spec.description!r}"


def _same_scorer(old: ScorerSpec, new: ScorerSpec) -> bool:
    """Whether ``new`` is ``old`` registered again: equal, or the same module's ``compute`` of the same name."""
    if old == new:
        return True
    a, b = old.compute, new.compute
    name = getattr(a, "__qualname__", None)
    # a lambda or a closure, or a callable without a name of its own (a functools.partial: its __qualname__ was read
    # here and raised AttributeError): not known to be the same code
    return a is not None and b is not None and isinstance(name, str) and "<" not in name and \
        (getattr(a, "__module__", None), name) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


# the scorers memaudit ships: what their code computes is versioned by audit.cache.CACHE_FORMAT, bumped by hand
SHIPPED = frozenset({"attention_entropy", "noise_magnitude", "guidance_geometry", "attention_entropy_late"})


def is_shipped(spec: ScorerSpec) -> bool:
    """Whether ``spec`` is one of the scorers memaudit ships (:data:`SHIPPED`), as its own module registered it (equal
    to that module's ``SPEC``): a spec registered under a shipped name with ``replace=True`` is not, even one with the
    shipped ``compute`` (or none, as ``attention_entropy``) and other settings (``higher_is_riskier`` flipped,
    another forward or scheduler): its code is keyed and checked like any contributed scorer's."""
    if spec.name not in SHIPPED:
        return False
    import sys

    module = sys.modules.get(f"audit.scorers.{spec.name}")  # imported by audit.scorers; not imported here
    return module is not None and getattr(module, "SPEC", None) == spec


def code_identity(spec: ScorerSpec) -> dict | None:
    """What identifies the values a scorer outside :data:`SHIPPED` computes, for the score cache's key (None for a
    shipped one): the spec's fields that change a stored value (``forward``, ``risk_column``,
    ``higher_is_riskier``, ``scheduler``, the columns) and a BLAKE2b digest of its ``compute``'s code: the bytes
    of the module file that defines it (helpers beside it included), or for a function without a readable file
    (defined in ``__main__`` or a notebook) its compiled code and constants without its file's path or lines, and for a
    callable object there its class's methods' (:func:`_unfiled_code_text`); for a :func:`functools.partial`, those
    of the function it wraps and the arguments it binds (:func:`_arguments_text`); for a callable object, its class's
    name with its module and its attributes (:func:`_settings_text`; for a bound method, its object's), so two
    instances that differ in one are two codes (an instance without attributes keeps the code it had before they
    were keyed); for a closure, the values it captured (two closures of one factory were one code); a function held
    in an attribute or captured, by its code and captured values (:func:`_code_text`), not its name alone; the plain
    module-level values the function reads (:func:`_globals_text`: ``K = 2``, then ``K = 3``, were one code).
    A contributor who edits a scorer's formula then gets a cold cache, not the old formula's scores."""
    if is_shipped(spec):
        return None
    import functools
    import hashlib
    import sys
    import types

    digest = hashlib.blake2b(digest_size=8)
    fn = spec.compute
    while isinstance(fn, functools.partial):  # the function it wraps is the code (functools.py was), its arguments
        digest.update(_arguments_text(fn.args, fn.keywords).encode())  # are settings of the formula
        fn = fn.func
    if fn is not None:
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        path = getattr(module, "__file__", None)
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except (OSError, TypeError):  # no file (a notebook, python -c): the function's own code
            digest.update(_unfiled_code_text(fn).encode())
        name = getattr(fn, "__qualname__", None)
        if not isinstance(name, str):  # a callable object: its class's name (two classes of one file were one code)
            name = type(fn).__qualname__
        digest.update(f"{getattr(fn, '__module__', '')}.{name}".encode())
        # a closure's captured values are settings too: make_scorer(10.0) and make_scorer(3.0) (one factory's inner
        # function, one file and name) were one code, so one was served the other's scores from the cache
        if cells := getattr(fn, "__closure__", None):
            digest.update(_settings_text([_cell_value(cell) for cell in cells]).encode())
        # the plain module-level values it reads (K = 2 in a notebook cell, or K = float(os.environ["K"]) in a
        # file) are settings too: K = 2, then K = 3 kept one code, so the second was served the first's scores
        digest.update(_globals_text(fn).encode())
        # a callable object's attributes (a bound method's object's) are settings of its formula, as a partial's
        # arguments: Scaled(10.0) and Scaled(3.0) were one code, so one was served the other's scores from the cache
        holder = fn.__self__ if isinstance(fn, types.MethodType) else fn
        if not isinstance(holder, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)) and (
                state := _attributes(holder)):
            digest.update(_settings_text(state).encode())
    return {"forward": spec.forward, "risk_column": spec.risk_column, "higher_is_riskier": bool(spec.higher_is_riskier),
            "scheduler": spec.scheduler, "columns": [c.name for c in spec.columns], "code": digest.hexdigest()}


def _unfiled_code_text(fn) -> str:
    """The code of a ``compute`` whose module has no file (a notebook cell, ``python -c``), as :func:`code_identity`
    keys it: a function's compiled code (:func:`_code_text`: bytecode, names and constants, without the file's path
    or line numbers); a callable object's, the code of its class's methods (those of each class it inherits from
    but ``object``). The marshalled code held the cell's file, ``/tmp/ipykernel_<pid>/...``, another in every
    kernel, so the same function was another code after a restart (a cold cache, its run folder not resumed); a
    callable object was keyed by its ``repr``, which names its memory address, another code for each instance."""
    import types

    code = getattr(fn, "__code__", None)  # a function, or a bound method (its function's)
    if code is not None:
        return _code_text(code, 0, frozenset())
    methods = [f"{cls.__qualname__}.{name}<{_code_text(value.__code__, 0, frozenset())}>"
               for cls in type(fn).__mro__ if cls is not object
               for name, value in sorted(vars(cls).items()) if isinstance(value, types.FunctionType)]
    return "; ".join(methods) if methods else _ADDRESS.sub("", repr(fn))


def _arguments_text(args: tuple, keywords: dict) -> str:
    """A :func:`functools.partial`'s bound arguments as :func:`code_identity` keys them: their ``repr``, as before,
    where it is exact (numbers, text, bytes, None and lists, tuples and dicts of them), else their
    :func:`_settings_text` (a NumPy array's ``repr`` elides its middle past 1,000 values, so two arrays that
    differ there were one code; an object's names its memory address, another code in every process)."""
    plain = (args, sorted(keywords.items()))
    if _plain(plain):
        return repr(plain)
    return f"partial{_settings_text([list(args), dict(keywords)])}"


def _plain(value, depth: int = 0) -> bool:
    """Whether ``repr(value)`` spells all of ``value`` (:func:`_arguments_text`): built-in numbers, text, bytes and
    None, in built-in lists, tuples and dicts, nested at most 8 levels."""
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return True
    if depth > 8:
        return False
    if type(value) in (list, tuple):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _cell_value(cell):
    """A closure cell's value (:func:`code_identity`); an empty cell (a name not yet bound) is ``None``."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _attributes(obj) -> dict:
    """An object's attributes: its ``__dict__`` and the ``__slots__`` of its classes that are set."""
    state = dict(getattr(obj, "__dict__", None) or {})
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and slot not in state and hasattr(obj, slot):
                state[slot] = getattr(obj, slot)
    return state


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # what object.__repr__ adds: another number in every process


def _settings_text(value, depth: int = 0, seen: frozenset = frozenset()) -> str:
    """A text of ``value`` that is the same in every process for equal settings and differs where they differ, for
    :func:`code_identity`: numbers, text, containers (dicts and sets in a fixed order) and objects' attributes
    (by their class's name) spelled out; an array (NumPy's, or a tensor) as its dtype, shape and a digest of its bytes;
    a function, class or module by its name; anything else as its ``repr`` without memory addresses. Nested past
    8 levels, or a cycle, is ``...``."""
    import hashlib

    if depth > 8 or id(value) in seen:
        return "..."
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    seen = seen | {id(value)}
    if isinstance(value, dict):
        items = sorted(f"{_settings_text(k, depth + 1, seen)}: {_settings_text(v, depth + 1, seen)}"
                       for k, v in value.items())
        return f"{type(value).__name__}{{{', '.join(items)}}}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(_settings_text(v, depth + 1, seen) for v in value)}]"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}{{{', '.join(sorted(_settings_text(v, depth + 1, seen) for v in value))}}}"
    if all(hasattr(value, a) for a in ("detach", "cpu", "numpy")):  # a torch tensor: its values, wherever they are
        try:
            value = value.detach().cpu().numpy()
        except Exception:  # noqa: BLE001 - a tensor NumPy cannot hold (bfloat16): its values as floats
            value = value.detach().cpu().float().numpy()
    if all(hasattr(value, a) for a in ("tobytes", "dtype", "shape")):  # a NumPy array
        digest = hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest()
        return f"array({value.dtype}, {tuple(value.shape)}, {digest})"
    import types

    if isinstance(value, types.FunctionType):  # a held function (a lambda in an attribute): its name, its code and
        # what it captured. By its name alone Held(lambda c: 2) and Held(lambda c: 3) were one code, so one was
        # served the other's scores from the cache
        cells = [_cell_value(cell) for cell in value.__closure__ or ()]
        return (f"{value.__module__}.{value.__qualname__}<{_code_text(value.__code__, depth + 1, seen)}>"
                f"{_settings_text(cells, depth + 1, seen) if cells else ''}{_globals_text(value)}")
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):  # a class, a builtin: its name
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if state := _attributes(value):
        return f"{type(value).__module__}.{type(value).__qualname__}({_settings_text(state, depth + 1, seen)})"
    return _ADDRESS.sub("", repr(value))


def _code_text(code, depth: int, seen: frozenset) -> str:
    """A function's compiled code as :func:`_settings_text` keys a held function: its bytecode, names and
    constants (nested code objects the same way; other constants as :func:`_settings_text` spells them), without
    its file's path or line numbers, so that the same code is one text in every clone and process (``marshal``
    writes the path)."""
    import types

    if depth > 8:
        return "..."
    consts = ", ".join(_code_text(c, depth + 1, seen) if isinstance(c, types.CodeType)
                       else _settings_text(c, depth + 1, seen) for c in code.co_consts)
    return f"{code.co_code.hex()}|{','.join(code.co_names)}|{','.join(code.co_varnames)}|[{consts}]"


def _globals_text(fn) -> str:
    """The plain module-level values a function reads, as :func:`code_identity` keys them: each name its code (nested
    code included) uses that its module binds to a value :func:`_plain` spells whole (a number, text, or a list, tuple
    or dict of them), as ``name=repr``, in name order; ``""`` when it reads none. For a callable object, those its
    class's methods read; for a bound method, its function's. A value in a file is in the file's bytes, but one set
    when the module runs (``K = float(os.environ["K"])``) or in a notebook cell (``K = 2``, then ``K = 3``) is not:
    by the code alone the second was served the first's cached scores. Other globals (modules, functions, arrays)
    are left out: keying an array a scorer reads would hash a model's weights at every lookup."""
    import types

    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    functions = [fn] if isinstance(fn, types.FunctionType) else [
        value for cls in type(fn).__mro__ if cls is not object for value in vars(cls).values()
        if isinstance(value, types.FunctionType)]
    values = {}
    for function in functions:
        names, codes = set(), [function.__code__]
        while codes:
            code = codes.pop()
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        bound = function.__globals__
        values.update({name: bound[name] for name in names if name in bound and _plain(bound[name])})
    return "".join(f"|{name}={values[name]!r}" for name in sorted(values))


def recorded_config(score_config: dict) -> dict:
    """A run's recorded score configuration (``ScoreConfig.to_dict()`` with its ``first_timestep``) with, for a
    scorer outside :data:`SHIPPED`, its ``scorer_code`` (:func:`code_identity`): the run folder's identity, its
    manifest, the calibrations made from it and the score cache then tell one version of a contributed scorer's
    formula from another (a calibration of the old formula was applied to the new one's risks). Unchanged for the
    shipped scorers and for a name not registered."""
    spec = SCORERS.get(score_config.get("scorer"))
    code = code_identity(spec) if spec is not None else None
    return dict(score_config) if code is None else dict(score_config) | {"scorer_code": code}


def unregister(name: str) -> None:
    """Remove a scorer (tests that register a toy one)."""
    SCORERS.pop(name, None)


def get_scorer(name: str) -> ScorerSpec:
    """The registered scorer ``name``.

    Raises:
        audit.errors.RunError: unknown name; the message lists the scorers and suggests the closest.
    """
    if name in SCORERS:
        return SCORERS[name]
    close = difflib.get_close_matches(name, list(SCORERS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RunError(f"--scorer {name}: choose one of {', '.join(SCORERS)}{hint}")


def score_columns() -> list[tuple[Column, bool]]:
    """The score columns of every risk table, in order, each with whether it is nullable: ``risk``, the
    capture columns (every scorer writes them), each registered scorer's own columns (null in runs of
    other scorers), then the per-layer columns (:data:`LAYER_COLUMNS`, null after a partial forward)."""
    own = [(c, True) for spec in SCORERS.values() for c in spec.columns]
    return [(RISK_COLUMN, False)] + [(c, False) for c in CAPTURE_COLUMNS] + own + [(c, True) for c in LAYER_COLUMNS]


def result_columns() -> tuple[str, ...]:
    """Names of the per-prompt arrays every scored batch yields and the score cache stores (as float64):
    the score columns, then ``n_tokens``, ``truncated`` and ``nonfinite``."""
    return tuple(c.name for c, _ in score_columns()) + ("n_tokens", "truncated", "nonfinite")
