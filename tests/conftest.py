"""Shared fixtures: a tiny seeded SD-architecture model built once per session (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test machines have 2 shared cores, and torch's OpenMP threads spin against each
# other (and against Ray workers) there, which made forwards 5-7x slower in measurements. Scores do not
# depend on the thread count beyond float rounding, which the tests' tolerances cover.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The width that rich and click lay out for when output is not a terminal (CliRunner, subprocesses), whatever
# the shell exported: with COLUMNS=50, typer's error boxes wrapped a message that a test looks for.
os.environ["COLUMNS"] = "80"
# and plain text: rich colours output that is not a terminal when FORCE_COLOR (or TTY_COMPATIBLE) says so, as
# some CI systems set it, and the tests read the words
for _var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
    os.environ.pop(_var, None)
# No cluster or Ray logging from the user's shell: the Ray tests start their own Ray and set these themselves
for _var in ("RAY_ADDRESS", "MEMAUDIT_RAY_LOGS"):
    os.environ.pop(_var, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from audit.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from audit.models import load_model

    return load_model(str(tiny_model_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict:
    """One tiny seeded model folder per family of test_families.BUILDERS (SD 2.x twice, SDXL, PixArt, SD 3.x),
    built once for the test files that read them (none writes into them: a test that edits one copies it)."""
    from test_families import BUILDERS

    return {k: build(tmp_path_factory.mktemp(k) / "model") for k, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def family_models(family_folders) -> dict:
    """:func:`family_folders`, each loaded on the CPU in float32."""
    from audit.models import load_model

    return {k: load_model(str(p), "cpu", "float32") for k, p in family_folders.items()}


@pytest.fixture(scope="session")
def scorer(tiny_model):
    from audit.scorers import ScoreConfig, Scorer

    return Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers)))


@pytest.fixture(scope="session")
def real_prompts() -> list[str]:
    """The 845 public prompts of ../shared/data (read from there, never copied into the repo)."""
    mem = SHARED_DATA / "sd1_memorized_345.txt"
    non = SHARED_DATA / "nonmemorized_500.txt"
    if not mem.exists():
        pytest.fail(f"{mem} is missing: the tests read the shared prompt lists from ../shared/data")
    return [line.rstrip("\n") for p in (mem, non) for line in p.open(encoding="utf-8")]


@pytest.fixture(scope="session")
def gen_pipeline(tmp_path_factory):
    """``(model folder, (pipeline, loaded model))``: a tiny seeded SD-architecture model with a VAE (8 px latents)
    and what :func:`audit.cli.generate.build_pipeline` returns for it (its ``StableDiffusionPipeline`` as `memaudit
    generate` builds it, and the :class:`audit.models.LoadedModel`), for the tests of generation."""
    from audit.cli.generate import build_pipeline
    from audit.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("gen") / "model", seed=0, sample_size=8, vae=True)
    return model_dir, build_pipeline(str(model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def lab_model():
    """The bundled lab model (``audit/lab/model``), loaded once: CPU, float32."""
    from audit.lab import LAB_MODEL_DIR
    from audit.models import load_model

    return load_model(str(LAB_MODEL_DIR), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def parts():
    """``(tokenizer, text encoder, UNet, scheduler, VAE)``: tiny seeded SD 1.x components with 8 px latents, for the
    tests of the mitigation on a diffusers pipeline (built once per test module that uses them)."""
    from audit.tiny import tiny_components, tiny_vae

    tok, te, unet, sch = tiny_components(seed=0, sample_size=8)
    return tok, te, unet, sch, tiny_vae()


@pytest.fixture()
def pipe(parts):
    """A ``StableDiffusionPipeline`` over :func:`parts` (no safety checker, no progress bar), one per test."""
    from diffusers import StableDiffusionPipeline

    tok, te, unet, sch, vae = parts
    p = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def launches(monkeypatch):
    """The padded batch size of each Scorer.launch (each forward), in order."""
    from audit.scorers import Scorer

    seen, original = [], Scorer.launch

    def launch(self, batch):
        seen.append(len(batch.tokens.attention_mask))
        return original(self, batch)

    monkeypatch.setattr(Scorer, "launch", launch)
    return seen
