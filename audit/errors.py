"""The exception hierarchy of memaudit, in one module with no imports.

Owns every error class a caller may catch. Must not import anything (no ``audit`` module, no torch,
pyarrow or polars): a module that only needs an error class imports this one, never pipeline code, so
no error class can cause an import cycle. The CLI maps :data:`KNOWN_ERRORS` to one-line messages.
"""

from __future__ import annotations


class MemauditError(Exception):
    """The base of every error class here: ``except audit.errors.MemauditError`` catches whatever memaudit raises
    for a reason it names (each class also derives from the built-in its meaning fits, RuntimeError or ValueError,
    so code that catches those still does). Not caught by it: ``TypeError`` for a wrong argument type or option
    name, ``KeyError`` for a layer the model does not have, as the functions' docstrings say."""


class RunError(MemauditError, RuntimeError):
    """A run cannot start or finish (mismatched rerun folder, failed unit); the message says why."""


class ConfigError(RunError):
    """A ``--config`` file cannot be read or holds an unknown option or a value of the wrong type."""


class CalibrationError(RunError):
    """A calibration cannot be made or does not fit the run (other model or score configuration)."""


class ReportError(RunError):
    """A run folder cannot be reported on (not a finished run, unknown --by column)."""


class RunFolderBusyError(RunError):
    """Another memaudit process holds the run folder's lock right now (a scheduler started the job again while the
    last one runs): nothing was done, and the same command later resumes or reuses the folder. The CLI exits 75
    (``EX_TEMPFAIL`` of sysexits.h: a temporary failure, retry later), so a scheduler can tell it from an error."""


class SourceError(MemauditError, RuntimeError):
    """An input cannot be used (missing, corrupt, no prompt column anywhere); the message names it."""


class ModelError(MemauditError, RuntimeError):
    """The model cannot be found or loaded (the message says what is missing)."""


class IncompleteCaptureError(MemauditError, RuntimeError):
    """A forward finished (or stopped) without every selected layer reporting its probabilities."""


class ScorerError(RunError):
    """A scorer's ``compute`` broke the seam's contract (docs/architecture.md, "How to add a scorer"): it returned
    no dict, a column it does not register, or a value that is not a float64 torch tensor of shape [B] on the
    scoring device. The scorer itself is broken, not the prompt: the run stops at once naming the scorer and the
    column (never retried prompt by prompt, never a per-row ``scoring_error``)."""


class SchemaError(MemauditError, ValueError):
    """A table does not match its schema in ``schemas/``."""


# errors the CLI reports in one line (a traceback only with --debug)
class FinishedRunError(RunError):
    """A run finished and wrote its outputs, and its outcome fails a gate (the subclasses say which).

    Attributes: ``out`` (the run folder) and ``manifest`` (its manifest dict), so a caller can inspect them."""

    def __init__(self, message: str, out=None, manifest: dict | None = None):
        super().__init__(message)
        self.out, self.manifest = out, manifest


class ScoringFailedError(FinishedRunError):
    """More rows than ``max_error_fraction`` could not be scored or could not be read as prompts, or rows were
    read and none was scored; the run's outputs were written first."""


class FlaggedPromptsError(FinishedRunError):
    """More rows were flagged than ``fail_on_flagged`` allows (a prompt on 3 rows counts 3); the run's outputs were
    written first."""


class MitigationError(MemauditError, ValueError):
    """Bad mitigation options, an unsupported model family, or a batch the rule cannot be applied to."""


class GenerateError(MemauditError, ValueError):
    """Options or inputs that stop ``memaudit generate`` before it generates (one line, exit 2)."""


KNOWN_ERRORS = (RunError, SourceError, ModelError, IncompleteCaptureError, SchemaError, FileNotFoundError)

# an empty --model (`--model "$MODEL"` with MODEL unset in a job's script) is refused, not read as the working folder
EMPTY_MODEL = "--model is empty: give a hub id or a model folder (or leave it out for the bundled lab model)"
