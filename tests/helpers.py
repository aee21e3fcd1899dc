"""Helpers shared by test modules (imported as ``helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import random
from pathlib import Path

from audit.pipeline import RunConfig

WORDS = "a photo of red blue cat dog city street beach sunset painting portrait old new small big".split()


def prompts_file(path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` distinct random prompts of 2-8 words (one a line) to ``path``."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + f" {i}\n"
                            for i in range(n)))
    return path


def run_audit(inputs, model, out, **kw):
    """``execute`` a run quietly; returns ``(run folder, manifest)``."""
    from audit.runner import execute

    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(model), out=str(out), **kw)
    return execute(cfg, progress=False, log=lambda msg: None)


def assert_identity_matches_loaded(folder, model, scorer: str = "attention_entropy") -> None:
    """What the Ray driver and a local rerun record from config files and file hashes alone
    (``audit.runner._identity_info``) equals what the loaded ``model`` gives: manifest info, score configuration
    and t0 (else a rerun would refuse its own run folder, or a Ray run record another model)."""
    from audit.engines import get_engine
    from audit.models import adapter_of
    from audit.runner import _identity_info, model_info, score_config_for, tokenizer_identity
    from audit.scorers import Scorer

    cfg = RunConfig(inputs=("x",), model=str(folder), device="cpu", dtype="float32", scorer=scorer)
    info, score_config, t0 = _identity_info(cfg, str(folder), get_engine("local"))
    m = model
    assert info == model_info(m.name, m.fingerprint, m.path, m.device, m.dtype, tokenizer_identity(m.path, m.tokenizer),
                              adapter_of(m).name)
    assert score_config == score_config_for(cfg, m.default_layers, m.dtype)
    assert t0 == Scorer(m, score_config).first_timestep


def generate_np(pipe, prompt, steps: int, seed: int = 0, **kw):
    """``pipe(prompt)``'s images as a float numpy array [N, H, W, 3], ``steps`` denoising steps, seeded."""
    import torch

    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kw).images


def embed(pipe, prompts):
    """The pipeline's text encoder's last hidden state of ``prompts`` padded to 77 tokens, [N, 77, D]."""
    import torch

    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def fail_batches_with(monkeypatch, word: str = "poison", error: Exception | None = None) -> None:
    """Make ``Scorer.launch`` raise ``error`` (default ``ValueError("this prompt breaks the model")``) on any batch
    holding a prompt with ``word`` (the engines then score that batch's prompts one by one, so only those prompts
    fail: reject rows with reason ``scoring_error``). ``monkeypatch.undo()`` heals the model."""
    from audit.scorers import Scorer

    original = Scorer.launch
    error = error if error is not None else ValueError("this prompt breaks the model")

    def launch(self, batch):
        if any(word in p for p in batch.prompts):
            raise error
        return original(self, batch)

    monkeypatch.setattr(Scorer, "launch", launch)


CACHE_HASHES = [f"{i:032x}" for i in range(12)]


def filled_cache(root: Path, parts: int = 3):
    """A score cache under ``root`` holding 12 entries (:data:`CACHE_HASHES`, every score column = 0..11) in ``parts``
    files."""
    import numpy as np

    from audit.cache import SCORE_COLUMNS, ScoreCache

    cache = ScoreCache(root, "fp", {"scorer": "attention_entropy", "seed": 0})
    step = len(CACHE_HASHES) // parts
    for i in range(0, len(CACHE_HASHES), step):
        cache.put(CACHE_HASHES[i:i + step], {c: np.arange(i, i + step, dtype=float) for c in SCORE_COLUMNS},
                  [[]] * step)
    return cache


def flip_a_bit_in_the_risk_page(part: Path) -> None:
    """Flip one bit in the last byte of the ``risk`` column chunk (its data page's payload): the footer and the
    page header stay intact, so only a checksum can tell."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(part).metadata
    col = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index("risk"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(part.read_bytes())
    data[start + col.total_compressed_size - 1] ^= 0x04
    part.write_bytes(bytes(data))


def labels_csv(tmp_path: Path, labels: list[str]) -> Path:
    """``tmp_path/labels.csv``: six prompts (prompt, memorized columns) with the given label texts, as `memaudit eval`
    reads a labelled table."""
    path = tmp_path / "labels.csv"
    prompts = ["a red cat", "a blue dog", "a green bird", "a fox", "a small house", "old city street"]
    path.write_text("prompt,memorized\n" + "".join(f"{p},{y}\n" for p, y in zip(prompts, labels)), encoding="utf-8")
    return path


def chromium_or_skip(what: str) -> str:
    """The path of a headless-capable Chromium for the browser tests. Without one the test fails under CI (`.ci/run`
    sets CI=true and installs it with .ci/install-chromium.sh: there the test must run) and is skipped elsewhere,
    saying that ``what`` did not run."""
    import os
    import shutil

    import pytest

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed in CI: .ci/install-chromium.sh failed; the browser test must run")
        pytest.skip(f"Chromium is not installed: {what} did NOT run (install it with .ci/install-chromium.sh)")
    return browser


def open_parquet_files(folder: Path) -> list[str]:
    """The names of the Parquet files in ``folder`` that this process holds open now (Linux: /proc/self/fd), sorted."""
    import os

    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted(Path(n).name for n in names if Path(n).parent == folder and n.endswith(".parquet"))


def dry_run_of_logs_lacking_the_column(tmp_path: Path, good: int, lacking: int, fraction: str):
    """``memaudit run LOGS --dry-run --max-error-fraction FRACTION`` (CliRunner's result) over a folder of two Parquet
    files: ``good`` rows with a ``prompt`` column and ``lacking`` rows with only ``text`` (missing_prompt_column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app

    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    pq.write_table(pa.table({"prompt": [f"a red cat {i}" for i in range(good)]}), logs / "a.parquet")
    pq.write_table(pa.table({"text": [f"a blue dog {i}" for i in range(lacking)]}), logs / "b.parquet")
    return CliRunner().invoke(app, ["run", str(logs), "--out", str(tmp_path / "out"), "--max-error-fraction", fraction,
                                    "--dry-run"])


def torn_calibration_refusal(tmp_path: Path, model, table_calibration: bytes, manifest_calibration=None) -> tuple:
    """A run of 4 prompts whose risk.parquet records ``table_calibration`` (its ``memaudit.calibration`` metadata) and
    whose manifest records ``manifest_calibration`` (None: as the run wrote it), as a rerun killed between the two
    leaves them; returns ``(run folder, the ReportError message build_report raises)``."""
    import json

    import pyarrow.parquet as pq
    import pytest

    from audit.errors import ReportError
    from audit.report import build_report

    run, _ = run_audit([prompts_file(tmp_path / "p.txt", 4)], model, tmp_path / "run", device="cpu", batch_size=8)
    table = pq.read_table(run / "risk.parquet")
    meta = dict(table.schema.metadata) | {b"memaudit.calibration": table_calibration}
    pq.write_table(table.replace_schema_metadata(meta), run / "risk.parquet")
    if manifest_calibration is not None:
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["calibration"] = manifest_calibration
        (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError) as err:
        build_report(run)
    return run, str(err.value)
