"""What a mutation review of audit/capture.py and audit/config.py found no test pinned: the bounds of the options that
--config files and audit.run() reach without the command line's own checks (--unit-rows 0, --noise-draws 0,
--max-error-fraction at and past its ends, an --out of spaces), the folder checks at their edges (a 255-byte name, a
parent without write permission), the readings of names and paths (empty names in a list, a path object for a
string option), the device and dtype names, and the bugs the review found (each test says which)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from audit.config import (RunConfig, check_folder_creatable, checked_option, device_dtype_problem, split_names,
                          validate_config)
from audit.errors import RunError


def _cfg(**kw) -> RunConfig:
    return RunConfig(inputs=("x.parquet",), **kw)


def _refusal(**kw) -> str:
    with pytest.raises(RunError) as err:
        validate_config(_cfg(**kw))
    return str(err.value)


# ---- validate_config: the bounds a TOML file or audit.run() reaches


def test_unit_rows_and_noise_draws_of_zero_are_refused_and_one_is_accepted():
    """A unit of 0 rows cannot be planned and 0 noise draws average nothing; both are refused in one line (the
    command line's own types do not see a TOML file's values)."""
    assert _refusal(unit_rows=0) == "--unit-rows must be at least 1"
    assert _refusal(noise_draws=0) == ("--noise-draws 0: give 1 to 1,024 (each draw is one more UNet row per prompt: "
                                       "K draws cost K times one)")
    # a typo of a million draws was taken, and ran a million times the cost (or filled memory) per prompt
    assert _refusal(noise_draws=1025).startswith("--noise-draws 1025: give 1 to 1,024")
    validate_config(_cfg(unit_rows=1, noise_draws=1))
    validate_config(_cfg(noise_draws=1024))


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 0}, "--batch-size 0: give an integer from 1 to 65,536 (short batches are padded to it, up to the "
                        "rows there are), or auto"),
    ({"batch_size": "big"}, "--batch-size 'big': give an integer from 1 to 65,536"),
    ({"prepare_threads": "four"}, "--prepare-threads four: give 0 (in the scoring thread), a positive integer or auto"),
    ({"prepare_threads": -1}, "--prepare-threads -1: give 0 (in the scoring thread), a positive integer or auto"),
    ({"prepare_threads": " 2 "}, "--prepare-threads ' 2 ': a number in quotes is text; write 2 without quotes"),
])
def test_text_and_zero_for_the_int_or_auto_options_are_refused(kw, message):
    """A TOML file's batch_size = 0 or prepare_threads = "four" reaches the check as it is (the command line's
    parser only sees the flags); each is one line naming the option, not a TypeError from comparing text with 0."""
    assert _refusal(**kw).startswith(message)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_max_error_fraction_takes_both_ends_of_zero_to_one(fraction):
    """0 (no row may fail) and 1 (never fail the run) are both fractions the option accepts."""
    validate_config(_cfg(max_error_fraction=fraction))


@pytest.mark.parametrize("fraction", [-0.01, 1.01, float("nan")])
def test_max_error_fraction_outside_zero_to_one_is_refused(fraction):
    assert _refusal(max_error_fraction=fraction) == (
        f"--max-error-fraction {fraction}: give a fraction from 0 to 1 (0.01 = 1%)")


def test_an_out_of_spaces_is_refused_as_empty(tmp_path, monkeypatch):
    """--out '  ' would make a folder named by two spaces in the working folder: refused like an empty --out."""
    monkeypatch.chdir(tmp_path)
    assert _refusal(out="  ") == "--out is empty: give a folder (or leave it out for a new dated folder)"
    assert list(tmp_path.iterdir()) == []


# ---- check_folder_creatable at its edges


def test_a_folder_name_of_255_bytes_is_taken_and_one_of_256_refused(tmp_path):
    """255 bytes is the longest name Linux file systems take; a 256-byte one is refused before any work (it failed
    with exit 1 once the model had loaded). Bytes, not characters: 128 two-byte letters are 256 bytes."""
    check_folder_creatable(tmp_path / ("n" * 255) / "r", "--out X")
    for name in ("n" * 256, "é" * 128):
        with pytest.raises(RunError) as err:
            check_folder_creatable(tmp_path / name / "r", "--out X")
        assert str(err.value) == (f"--out X: the name {name[:40]}... is longer than 255 bytes, more than a file system "
                                  "takes")


def test_a_parent_without_write_permission_is_refused_naming_it(tmp_path, monkeypatch):
    """The nearest existing parent must be writable and searchable (os.access W_OK | X_OK; the tests run as root,
    where permission bits do not refuse, so os.access is stubbed). An existing --out folder must be writable itself:
    it was not asked, and a rerun into a read-only folder failed at its lock, after the model had loaded."""
    asked = []

    def access(path, mode):
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(RunError) as err:
        check_folder_creatable(tmp_path / "new" / "run", "--out new/run")
    assert str(err.value) == f"--out new/run: cannot make a folder in {tmp_path} (no write permission)"
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]
    asked.clear()
    with pytest.raises(RunError) as err:
        check_folder_creatable(tmp_path, "--out here")  # exists: resumed or written in, so written in
    assert str(err.value) == f"--out here: cannot write in {tmp_path} (no write permission)"
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    check_folder_creatable(tmp_path, "--out here")


# ---- config files


def test_a_missing_config_file_and_an_option_like_no_other_are_one_line_each(tmp_path):
    """--config naming no file is a ConfigError naming it (not a FileNotFoundError from reading it); an unknown key
    close to no option lists the options instead of a did-you-mean."""
    from dataclasses import fields

    from audit.config import load_config_file
    from audit.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config_file(tmp_path / "nope.toml")
    assert str(err.value) == f"--config {tmp_path / 'nope.toml'}: no such file"
    (tmp_path / "c.toml").write_text('inputs = "a"\nzzz = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config_file(tmp_path / "c.toml")
    assert str(err.value) == (f"--config {tmp_path / 'c.toml'}: unknown option 'zzz'; options: "
                              + ", ".join(f.name for f in fields(RunConfig)))


# ---- names, paths and device names


def test_split_names_skips_empty_names_and_strips_spaces():
    """'a, ,b,' is two names (an empty name between commas or at the end is dropped), and a quoted name keeps its
    comma."""
    assert split_names("a, ,b,") == ("a", "b")
    assert split_names(' user , "city, state",,') == ("user", "city, state")
    assert split_names("") == ()


def test_a_path_object_for_a_string_option_is_its_string(tmp_path):
    """audit.run(out=Path(...), calibration=Path(...)) takes path objects, recorded as their strings."""
    got = checked_option("calibration", tmp_path / "cal.json", "audit.run()")
    assert got == str(tmp_path / "cal.json") and type(got) is str
    assert checked_option("cache", Path("c"), "audit.run()") == "c"


@pytest.mark.parametrize("device, dtype, problem", [
    ("cuda:", "auto", "--device cuda:: choose auto, cpu, cuda or cuda:N"),
    ("CPU", "auto", "--device CPU: choose auto, cpu, cuda or cuda:N"),
    ("cpu", "float64", "--dtype float64: choose auto, float32, float16 or bfloat16"),
    ("cpu", "half", "--dtype half: choose auto, float32, float16 or bfloat16"),
])
def test_device_and_dtype_names_outside_the_list_are_refused(device, dtype, problem):
    assert device_dtype_problem(device, dtype) == problem


@pytest.mark.parametrize("device, dtype", [("cuda", "bfloat16"), ("cuda:0", "float16"), ("auto", "float32"),
                                           ("cpu", "auto"), ("mps", "float32")])
def test_the_listed_device_and_dtype_names_are_accepted(device, dtype):
    assert device_dtype_problem(device, dtype) is None


# ---- bugs


def test_a_layer_named_twice_is_one_layer_in_the_run_and_its_scores(tiny_model):
    """`memaudit run --layers X,X,Y` scored the mean over [X, X, Y] (the capture records X once, the scorer's mean
    over its configured layers counted it twice), so its scores differed from --layers X,Y and from `memaudit eval
    --layers X,X,Y` (which takes each layer once), and its run identity named X twice. The run's configuration now
    takes each layer once: the score configuration is (X, Y) and the scores are --layers X,Y's exactly."""
    from audit.capture import cross_attention_layers
    from audit.runner import score_config_for
    from audit.scorers import ScoreConfig, Scorer

    x, y = cross_attention_layers(tiny_model.unet)[3], cross_attention_layers(tiny_model.unet)[0]
    twice = _cfg(layers=(x, x, y))
    assert twice.layers == (x, y) and twice.to_dict()["layers"] == [x, y]
    assert _cfg(layers=[y, x, y]).layers == (y, x)  # the first mention's order
    sc = score_config_for(twice, tiny_model.default_layers, "float32")
    assert sc.layers == (x, y)
    prompts = ["a red cat on the beach", "old city street at night"]
    once = Scorer(tiny_model, score_config_for(_cfg(layers=(x, y)), (), "float32")).score(prompts)["risk"]
    assert list(Scorer(tiny_model, sc).score(prompts)["risk"]) == list(once)
    # a ScoreConfig built from Python (audit.score, a notebook) takes each layer once too
    direct = ScoreConfig("attention_entropy", (x, x, y))
    assert direct.layers == (x, y) and direct.to_dict()["layers"] == [x, y]
    assert list(Scorer(tiny_model, direct).score(prompts)["risk"]) == list(once)


def test_out_under_the_home_folder_expands_its_fields_and_quotes_a_bad_brace_from_the_template(monkeypatch, tmp_path):
    """expand_out replaced ~ before reading the braces: `--out '~/runs/{Date}'` was refused quoting the wrong text
    (near 'e}', the characters at the brace's place in the expanded path, not in what was typed), and a home folder
    with a brace in its name (/home/a{b}) refused every `--out ~/...`. The fields are filled first, then ~."""
    import datetime as dt

    from audit.config import expand_out
    from audit.errors import ConfigError

    home = tmp_path / "a{b}"
    monkeypatch.setenv("HOME", str(home))
    now = dt.datetime(2026, 12, 3, 7, 5, 9, tzinfo=dt.timezone.utc)
    assert expand_out("~/runs/{date}-{time}", now) == f"{home}/runs/2026-12-03-070509"
    assert expand_out("~/{{x}}", now) == f"{home}/{{x}}"
    monkeypatch.setenv("HOME", "/home/someone")
    for template, near in (("~/runs/{Date}", "~/runs/{Date}"), ("~/nightly/a/{date", "ghtly/a/{date")):
        with pytest.raises(ConfigError) as err:
            expand_out(template, now)
        assert str(err.value) == (f"--out {template}: a brace that is not {{date}} or {{time}} (near '{near}'); --out "
                                  "expands {date} and {time} (UTC), and {{ and }} are a brace in the folder's name")


def test_the_joint_capture_is_float32_under_autocast():
    """The SD 3.x joint-layer capture ran its Q K^T matmul and softmax in autocast's dtype: under a bfloat16 autocast
    its record was bfloat16 (the cross-attention capture switches autocast off; both promise float32). Now the
    record is float32 and exactly the float32 softmax of the layer's own (autocast) q and added-k projections."""
    import torch
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    from audit.capture import CrossAttentionCapture

    attn = Attention(query_dim=16, cross_attention_dim=None, added_kv_proj_dim=16, dim_head=4, heads=4, out_dim=16,
                     context_pre_only=False, bias=True, processor=JointAttnProcessor2_0()).eval()
    holder = torch.nn.Module()
    holder.add_module("attn", attn)
    g = torch.Generator().manual_seed(3)
    h, c = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k = attn.to_q(h), attn.add_k_proj(c)  # the projections are the model's, in autocast's dtype
        with CrossAttentionCapture(holder, ["attn"], early_exit=False) as cap:
            got = cap.run(lambda: holder.attn(hidden_states=h, encoder_hidden_states=c))["attn"]
    assert q.dtype == torch.bfloat16 and got.dtype == torch.float32
    q, k = (x.view(2, -1, 4, 4).transpose(1, 2).float() for x in (q, k))
    expected = ((q @ k.transpose(-1, -2)) * 0.5).softmax(dim=-1).mean(dim=(1, 2))  # scale 1/sqrt(4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_a_capture_entered_twice_is_refused_and_its_processors_are_restored(tiny_model):
    """Entering an open capture again took the capture's own processors as the originals: the inner exit put them
    back and the outer exit restored nothing, so the UNet kept recording (and stopping early) for good. The second
    entry is refused; the open block still captures, and on its exit the UNet has its own processors again."""
    import torch

    from audit.capture import CrossAttentionCapture

    unet = tiny_model.unet
    layer = tiny_model.default_layers[0]
    module = unet.get_submodule(layer)
    original = module.get_processor()
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    cap = CrossAttentionCapture(unet, [layer])
    with torch.no_grad(), cap:
        with pytest.raises(RuntimeError, match="^this CrossAttentionCapture is already entered: enter a new one"):
            with cap:
                pass
        probs = cap.run(lambda: unet(x, torch.tensor(981), encoder_hidden_states=c))
        assert probs[layer].shape == (1, 77) and cap.calls == {layer: 1}
    assert module.get_processor() is original
    with torch.no_grad(), cap:  # entered again after its exit: a capture is reusable
        assert cap.run(lambda: unet(x, torch.tensor(981), encoder_hidden_states=c))[layer].shape == (1, 77)
    assert module.get_processor() is original


def test_a_config_files_out_keeps_its_brace_escapes_and_the_braces_of_its_folder(tmp_path):
    """A config file's out had {date} and {config_dir} filled in before --out read its braces: a config file in a
    folder named jobs{prod} with out = "{config_dir}/runs/{date}" was refused ('a brace that is not {date} or
    {time}', near 'jobs{prod}'), and out = "runs/{{date}}" became runs/{2026-12-07}, refused too, where --out
    'runs/{{date}}' is a folder named runs/{date}. Other options still take {config_dir} as the folder's name."""
    import datetime as dt

    from audit.config import expand_out, load_config_file

    folder = tmp_path / "jobs{prod}"
    folder.mkdir()
    (folder / "c.toml").write_text('inputs = "{config_dir}/p.txt"\nout = "{config_dir}/runs/{date}-{time}"\n'
                                   'calibration = "{config_dir}/cal.json"\n')
    (folder / "d.toml").write_text('inputs = "p.txt"\nout = "runs/{{date}}-{date}"\n')
    now = dt.datetime(2026, 12, 3, 7, 5, 9, tzinfo=dt.timezone.utc)
    day = lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # noqa: E731 - {date} is the load's day
    before = day()
    got, escaped = load_config_file(folder / "c.toml"), load_config_file(folder / "d.toml")["out"]
    days = {before, day()}  # one day, or two across midnight UTC
    assert got["inputs"] == (f"{folder}/p.txt",) and got["calibration"] == f"{folder}/cal.json"
    assert expand_out(got["out"], now) in {f"{folder}/runs/{d}-070509" for d in days}
    validate_config(RunConfig(**got))
    assert expand_out(escaped, now) in {f"runs/{{date}}-{d}" for d in days}


def test_a_capture_of_one_string_or_an_empty_generator_is_refused(tiny_model):
    """A layer name given as a string was read as its characters (KeyError: not an attention layer of this UNet: d),
    and an empty generator passed the empty-selection check (a generator is truthy): the capture then installed
    nothing, ran the whole forward and returned {} without a word. A generator of names is read once and taken."""
    import torch

    from audit.capture import CrossAttentionCapture

    unet = tiny_model.unet
    layer = tiny_model.default_layers[0]
    with pytest.raises(TypeError) as err:
        CrossAttentionCapture(unet, layer)
    assert str(err.value) == f"layers must be a list of module paths, not one string: give [{layer!r}]"
    with pytest.raises(KeyError, match="no cross-attention layer selected"):
        CrossAttentionCapture(unet, (n for n in []))
    cap = CrossAttentionCapture(unet, (n for n in [layer, layer]))
    assert cap.layers == [layer]
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad(), cap:
        assert list(cap.run(lambda: unet(x, torch.tensor(981), encoder_hidden_states=c))) == [layer]


# ---- the configuration a run folder keeps (run.json) and a rerun is compared with


@pytest.mark.parametrize("change, clause", [
    ({"prompt_column": "text"}, "prompt_column: 'prompt' -> 'text'"),
    ({"id_column": "uid"}, "id_column: None -> 'uid'"),
    ({"keep_columns": ("app",)}, "keep_columns: [] -> ['app']"),
    ({"limit": 2}, "limit: None -> 2"),
    ({"unit_rows": 2}, "unit_rows: 20000 -> 2; units: 1 -> 2"),
    ({"fingerprint": "f2"}, "model_fingerprint: 'f1' -> 'f2'"),
    ({"seed": 1}, "score_config.seed: 0 -> 1"),
])
def test_a_rerun_that_changes_an_option_of_the_run_identity_is_refused_naming_it(tmp_path, change, clause):
    """Each option run.json records decides what a resumed folder holds: another prompt or id column, other kept
    columns, another --limit or unit size, another model or score setting is another run, refused with the option
    and both values (nothing pinned the first four: a rerun dropping one would have resumed a folder of other
    rows). Options outside the identity (batch size, engine, workers) do not refuse."""
    import dataclasses

    from audit.pipeline import build_plan, refusal, run_identity, same_run

    src = tmp_path / "p.csv"
    src.write_text("prompt,text,uid,app\na red cat,x,1,a\nold street,y,2,b\nblue car,z,3,c\n")

    def identity(cfg, fingerprint="f1", seed=0):
        score_config = {"scorer": "attention_entropy", "layers": ["x.attn2"], "seed": seed}
        return run_identity(cfg, build_plan(cfg), {"fingerprint": fingerprint}, score_config)

    base = RunConfig(inputs=(str(src),))
    old = identity(base)
    same = identity(dataclasses.replace(base, batch_size=8, engine="ray", workers=3, stall_timeout=None))
    assert same_run(old, same)
    kw = {k: v for k, v in change.items() if k not in ("fingerprint", "seed")}
    new = identity(dataclasses.replace(base, **kw), change.get("fingerprint", "f1"), change.get("seed", 0))
    assert not same_run(old, new)
    models = (" It was scored with a model with fingerprint f1; this command names model [f2], another model or "
              "checkpoint (each model's run needs its own --out; memaudit diff compares two runs).")
    assert refusal(tmp_path, old, new) == (f"{tmp_path} holds a different run: {clause}."
                                           f"{models if 'fingerprint' in change else ''} Choose another --out, or "
                                           "rerun the original command to resume it.")


def test_a_rerun_over_a_folder_that_grew_names_the_new_file_and_the_way_forward(tmp_path):
    """One more partition in the input folder: the refusal names the new file (not also 'units: 1 -> 2', which
    follows from it) and says how a scheduled audit goes on (a folder per run, with --cache)."""
    from audit.pipeline import build_plan, refusal, run_identity, same_run

    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.txt").write_text("a red cat\n")
    cfg = RunConfig(inputs=(str(folder),))

    def identity():
        return run_identity(cfg, build_plan(cfg), {"fingerprint": "f"}, {"scorer": "attention_entropy"})

    old = identity()
    (folder / "b.txt").write_text("old street\n")
    new = identity()
    assert (old["units"], new["units"]) == (1, 2) and not same_run(old, new)
    assert refusal(tmp_path, old, new) == (
        f"{tmp_path} holds a different run: new input file {folder / 'b.txt'}. Its inputs changed since it ran (a "
        "growing folder). For a scheduled audit give each run its own folder, e.g. --out 'runs/{date}-{time}' (UTC; in "
        "a --config file too), with --cache DIR so that prompts scored before are read, not scored again; or rerun "
        "over the original inputs to resume this folder.")
