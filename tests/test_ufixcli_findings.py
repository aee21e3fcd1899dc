"""Findings of session 52's command-line fixes (helper ufixcli): the dry run's check of a model folder's
memaudit.json default layers, ``--confirm-top`` fractions that round to no prompt, empty path options, unreadable
folders inside an input, and ``memaudit generate``'s read-only output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"


def _model_naming(root: Path, tiny_model_dir: Path, layers: list[str]) -> Path:
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "memaudit.json").write_text(json.dumps({"default_layers": layers}))
    return model


# ------------------------------------------------------------------ 1. the dry run and memaudit.json's layers

@pytest.mark.parametrize("layer", [MID.replace("attn2", "attn1"), "mid_block.attentions.0", "mid_block"])
def test_the_dry_run_refuses_memaudit_json_layers_that_are_no_cross_attention_layer_with_the_runs_line(
        tmp_path, tiny_model_dir, layer):
    """A memaudit.json naming a module that holds weights but is no cross-attention layer (an attn1 self-attention,
    a transformer, a block) passed ``run --dry-run`` (exit 0) and the run refused it (exit 2). The dry run now
    refuses it with the run's exact line."""
    model = _model_naming(tmp_path, tiny_model_dir, [layer])
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    base = ["run", str(src), "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]
    dry = CliRunner().invoke(app, [*base, "--dry-run"])
    res = CliRunner().invoke(app, base)
    assert (dry.exit_code, res.exit_code) == (2, 2)
    assert dry.stderr.startswith(f"memaudit: error: {model / 'memaudit.json'}: default_layers {layer}: not a "
                                 f"cross-attention layer of this UNet: {layer}. Cross-attention layers: down_blocks.0.")
    assert dry.stderr == res.stderr.splitlines()[-1] + "\n"
    assert not (tmp_path / "o").exists()


def test_cross_attention_layers_read_from_the_weights_are_those_of_the_built_denoiser(tiny_model_dir):
    """The dry run accepts memaudit.json's layers from the safetensors headers where they are among the layers the
    family's rule finds there; on the tiny SD 1.x model and the bundled lab model that set is the built denoiser's
    (every family's folder: test_uleftovers_findings); a folder without weights gives None (built from config)."""
    from audit.lab import LAB_MODEL_DIR
    from audit.models import detect_family

    for root in (tiny_model_dir, LAB_MODEL_DIR):
        adapter, _ = detect_family(Path(root), str(root))
        assert adapter.layers_from_weights(Path(root)) == set(adapter.layers_from_config(Path(root)))
        assert MID in adapter.layers_from_weights(Path(root))
    assert adapter.layers_from_weights(Path("/nonexistent")) is None


def test_a_dry_run_of_memaudit_json_cross_attention_layers_imports_no_torch(tmp_path, tiny_model_dir):
    """Layers the weights' names show to be cross-attention layers are accepted without building the denoiser:
    the dry run of the bundled lab model (whose memaudit.json names its default layer) and of a folder naming every
    layer imports neither torch nor diffusers; a folder naming an attn1 is judged on the built denoiser."""
    every = _model_naming(tmp_path, tiny_model_dir, [MID, MID.replace("mid_block", "up_blocks.1").replace(
        "attentions.0", "attentions.1")])
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    code = ("import sys; from audit.config import RunConfig; from audit.runner import dry_run\n"
            "for m in sys.argv[2:]:\n"
            "    dry_run(RunConfig(inputs=(sys.argv[1],), model=m or None, out=sys.argv[1] + '.out'), log=print)\n"
            "print(sorted(k for k in ('torch', 'diffusers') if k in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(src), "", str(every)], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]"


# ------------------------------------------------------------------ 2. --confirm-top: one rule for every fraction

@pytest.mark.parametrize("top, n, want", [
    ("1e-300", 576, 1), ("1e-500", 576, 1), ("1e-500%", 576, 1), ("1e-10000", 576, 1), ("1e-10001", 576, 1),
    ("1e-99999999", 576, 1), ("1e-500", 0, 0),
    # the ceiling's boundary: 6/576 confirms 6, a hair above it 7, 1% of 576 (5.76) 6
    ("0.010416666666666666", 576, 6), ("0.0104166666666666667", 576, 7), ("1%", 576, 6), ("100%", 576, 576),
    ("1", 576, 1)])
def test_any_fraction_above_zero_is_rounded_up_to_at_least_one_prompt(top, n, want):
    """``--confirm-top 1e-300`` confirmed one prompt and ``1e-500`` was refused as zero (``give a fraction ...``):
    its decimal exponent was past the float's, so it was read as the float 0. Every fraction above 0 is now
    rounded up by one rule (ceil(fraction * prompts)), however small: at least one prompt."""
    from audit.cascade import check_confirm_options, top_size
    from audit.config import RunConfig

    assert top_size(top, n) == want
    check_confirm_options(RunConfig(inputs=("x.txt",), confirm="noise_magnitude", confirm_top=top))


@pytest.mark.parametrize("top", ["0", "0%", "0e-500", "-1e-500", "-1e-99999999", "0.0e-20000"])
def test_a_fraction_of_zero_or_below_is_refused_however_it_is_written(top):
    from audit.cascade import top_size
    from audit.errors import RunError

    with pytest.raises(RunError, match=f"^--confirm-top {top}: give a fraction of the distinct prompts"):
        top_size(top, 576)


def test_a_run_with_confirm_top_1e_500_confirms_one_prompt_as_1e_300_does(tmp_path, tiny_model_dir):
    """End to end: both values confirm exactly the top prompt of three (the manifest's confirm section)."""
    src = tmp_path / "p.txt"
    src.write_text("a red cat\nblue dog on a beach\nold city street\n")
    for top in ("1e-300", "1e-500"):
        out = tmp_path / top
        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--out",
                                       str(out), "--no-progress", "--confirm", "noise_magnitude", "--confirm-top", top])
        assert res.exit_code == 0, res.output
        confirm = json.loads((out / "manifest.json").read_text())["confirm"]
        assert (confirm["top"], confirm["unique_prompts_confirmed"], confirm["screened_unique_prompts"]) == (top, 1, 3)


def test_the_run_help_says_a_fraction_is_rounded_up():
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert "rounded up, so any fraction above 0 confirms at least one prompt" in " ".join(res.output.split())


# ------------------------------------------------------------------ 3. an empty path, in every command

@pytest.mark.parametrize("args, label", [
    (["report", "RUN", "--format", "html", "-o", ""], "-o / --output"),
    (["report", ""], "RUN_DIR"),
    (["calibrate", "RUN", "-o", ""], "-o / --output"),
    (["calibrate", "", "-o", "c.json"], "REFERENCE_RUN"),
    (["diff", "OLD", "NEW", "--format", "md", "--output", ""], "-o / --output"),
    (["diff", "", "NEW"], "OLD_RUN"),
    (["generate", "p.txt", "--model", "m", "--out", ""], "-o / --out"),
    (["generate", "p.txt", "--model", "m", "-o", "g", "--calibration", ""], "--calibration"),
    (["generate", "", "--model", "m", "-o", "g"], "PROMPTS"),
    (["eval", ""], "LABELLED"),
    (["lab", "build", "--out", ""], "--out"),
    (["lab", "eval", "--prompts", ""], "--prompts"),
    (["lab", "mitigation", "--training-on", ""], "--training-on"),
    (["run", "p.txt", "--config", "", "--dry-run"], "--config"),
])
def test_an_empty_path_is_refused_naming_its_option_in_every_command(tmp_path, monkeypatch, args, label):
    """``-o ''`` was read as ``Path('')``, the working folder: ``report RUN -o ''`` said "--output .: an HTML report
    is written to a .html file", ``calibrate`` "--output .", ``lab build --out ''`` trained into the working folder
    and ``run --config ''`` said ".: is a folder". Every path option and argument now refuses an empty value in one
    line naming it, exit 2, before the command does anything."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("audit.lab.build.build_lab", lambda *a, **k: pytest.fail("lab build ran"))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"memaudit: error: {label} is empty: give a file or folder name ('.' names the working "
                          "folder)\n")
    assert list(tmp_path.iterdir()) == []


def test_empty_values_with_a_meaning_of_their_own_are_kept(tmp_path, monkeypatch):
    """``run --cache ''`` (drop the --config file's cache) still runs; ``run --out ''`` keeps run's own line; ``-o
    .`` is still the working folder as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", "p.txt", "--cache", "", "--dry-run", "--out", "o"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["run", "p.txt", "--out", "", "--dry-run"])
    assert (res.exit_code, res.stderr) == (2, "memaudit: error: --out is empty: give a folder (or leave it out for a "
                                              "new dated folder)\n")
    res = CliRunner().invoke(app, ["calibrate", "RUN", "-o", "."])
    assert (res.exit_code, res.stderr) == (2, "memaudit: error: --output .: a calibration is written to a .json file\n")


def test_the_empty_path_check_is_installed_in_this_typer():
    """The check lives in typer's parameter processing (audit.cli.common._empty_paths_refused): an upgrade of typer
    that moves it fails here rather than silently reading '' as the working folder again."""
    from typer.core import _TyperParameter

    assert getattr(_TyperParameter.process_value, "memaudit_empty_paths", False)


# ------------------------------------------------------------------ 4. a folder that opens but cannot be read

def _fails_while_read(monkeypatch, denied: Path) -> None:
    """Make ``os.scandir(denied)`` open and then fail while its entries are read, as ``/proc/1/map_files`` does
    (even for root): opendir succeeds, readdir gives EACCES."""
    import errno

    real = os.scandir

    class Listing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def __iter__(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(denied))

    monkeypatch.setattr(os, "scandir", lambda path=".": Listing() if str(path) == str(denied) else real(path))


def test_a_folder_that_opens_but_fails_while_listed_is_refused_or_skipped_as_an_unlistable_one(tmp_path,
                                                                                              tiny_model_dir,
                                                                                              monkeypatch):
    """`memaudit run /` (or /proc) exited 1 with "PermissionError: [Errno 13] Permission denied:
    '/proc/1/map_files' (run with --debug for the traceback)": that folder opens and fails only while its entries
    are read, where the discovery did not look for an error. It is now what a folder that cannot be opened is (the
    README's unreadable files): refused in one line naming it and --skip-bad-files (exit 2), or with the flag skipped,
    listed in the manifest, and the rest scored."""
    logs = tmp_path / "logs"
    (logs / "dt=1").mkdir(parents=True)
    (logs / "dt=1" / "part-0.txt").write_text("a red cat\na blue dog\n")
    denied = logs / "dt=2"
    denied.mkdir()
    (denied / "part-0.txt").write_text("a green tree\n")
    _fails_while_read(monkeypatch, denied)
    base = ["run", str(logs), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "refused")])
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"memaudit: error: {denied}: cannot list the folder (Permission denied) (--skip-bad-files "
                          "skips such files and goes on)\n")
    assert not (tmp_path / "refused").exists()
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "skipped"), "--skip-bad-files"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "skipped" / "manifest.json").read_text())
    assert (manifest["counts"]["rows_read"], manifest["counts"]["scored"]) == (2, 2)
    assert manifest["skipped_files"] == [{"path": str(denied), "reason": f"{denied}: cannot list the folder "
                                                                          "(Permission denied)", "unreadable": True}]


# ------------------------------------------------------------------ 5. generate's read-only output folder

@pytest.mark.parametrize("existing", [True, False])
def test_generate_refuses_a_read_only_out_with_runs_line_before_the_model_loads(tmp_path, monkeypatch, existing):
    """`memaudit generate ... --out DIR` on a read-only mount loaded the model, then said "--out DIR: cannot create
    the folder DIR/images (OSError: Read-only file system)" (or, for a folder it had written before, "cannot make
    the run folder or its lock there"), where `memaudit run --out DIR` says at once "--out DIR: cannot write in DIR
    (on a read-only file system)". generate now checks --out as run does, with run's line, before loading."""
    mount = tmp_path / "ro"
    mount.mkdir()
    out = mount / "g" if not existing else mount
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(mount) and mode & os.W_OK
                        else real_access(p, mode, **kw))
    monkeypatch.setattr("audit.config._read_only_mount", lambda folder: str(folder) == str(mount))
    monkeypatch.setattr("audit.cli.generate.build_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    gen = CliRunner().invoke(app, ["generate", str(src), "--model", "m", "--out", str(out), "--steps", "2"])
    run = CliRunner().invoke(app, ["run", str(src), "--out", str(out), "--dry-run"])
    assert (gen.exit_code, run.exit_code) == (2, 2), gen.output
    want = (f"memaudit: error: --out {out}: cannot write in {mount} (on a read-only file system)\n" if existing else
            f"memaudit: error: --out {out}: cannot make a folder in {mount} (on a read-only file system)\n")
    assert gen.stderr == run.stderr == want
    assert list(mount.iterdir()) == []


def test_an_output_folder_whose_lock_cannot_be_made_is_named_by_its_command(tmp_path, monkeypatch):
    """The lock's refusal (a special file system the checks before could not tell) said "run folder" of
    generate's folder too."""
    from audit.errors import RunError
    from audit.pipeline import out_lock

    target = tmp_path / "o"
    real_mkdir = Path.mkdir

    def refused(self, *a, **k):
        if self == target:
            raise OSError(30, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refused)
    for command, folder in (("memaudit run", "run folder"), ("memaudit generate", "output folder")):
        with pytest.raises(RunError) as err:
            with out_lock(target, command):
                pass
        assert str(err.value) == f"--out {target}: cannot make the {folder} or its lock there (Read-only file system)"
