"""Pins what audit.models (folders, hub patterns, fingerprint, device and dtype, family detection, the SD 1.x/2.x
adapters), the batch-size probe and audit.faults promise where a hand-applied mutant of that code passed every
other test: hub downloads fetch safetensors and configs only, an absolute path is never sent to the hub, the
fingerprint is the documented SHA-256 (files sorted whatever the folder lists, the transformer included, settings in
key order), devices and dtypes resolve as documented, pickled text-encoder weights are refused from the identity, a
loaded model is in eval mode without gradients and its fingerprint counts its score settings, the batch probe counts
only what a probe allocates, and a watchdog counts a stall from when it is entered. Values are hand-derived: hashes by
hashlib in the documented order, memory arithmetic by hand, fnmatch for the hub's patterns."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil

import pytest
import torch

from audit.errors import ModelError


def _folder(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ---------------------------------------------------------------- resolve_model_dir: local paths and the hub

def _hub_patterns(tmp_path, monkeypatch, name="owner/model"):
    """The allow_patterns resolve_model_dir hands to snapshot_download for ``name`` (replaced: no network)."""
    import huggingface_hub

    from audit.models import resolve_model_dir

    seen = []

    def fake(repo_id, allow_patterns=None, **kw):
        seen.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    got = resolve_model_dir(name)
    assert got == (name, tmp_path / "snapshot") and [s[0] for s in seen] == [name]
    return seen[0][1]


def test_the_hub_fetches_safetensors_weights_and_configs_never_pickles(tmp_path, monkeypatch):
    """Every file memaudit reads matches a pattern; no pickled weights (.bin, .ckpt, .pt) and no VAE weights do."""
    patterns = _hub_patterns(tmp_path, monkeypatch)
    wanted = ["model_index.json", "memaudit.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer_2/tokenizer_config.json", "tokenizer_3/spiece.model", "scheduler/scheduler_config.json",
              "vae/config.json"]
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        wanted += [f"{comp}/config.json", f"{comp}/model.safetensors"]
    for comp in ("unet", "transformer"):
        wanted += [f"{comp}/config.json", f"{comp}/diffusion_pytorch_model.safetensors"]
    refused = ["vae/diffusion_pytorch_model.safetensors", "safety_checker/model.safetensors", "v1-5.ckpt"]
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        refused += [f"{comp}/pytorch_model.bin", f"{comp}/model.ckpt"]
    for comp in ("unet", "transformer"):
        refused += [f"{comp}/diffusion_pytorch_model.bin", f"{comp}/diffusion_pytorch_model.ckpt",
                    f"{comp}/weights.pt"]
    matched = {f: any(fnmatch.fnmatch(f, p) for p in patterns) for f in wanted + refused}
    assert [f for f in wanted if not matched[f]] == []
    assert [f for f in refused if matched[f]] == []


def test_an_absolute_path_that_is_not_there_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    """``/models`` has one slash like owner/name, but a path: refused as no such folder, the hub never asked."""
    import huggingface_hub

    from audit.models import resolve_model_dir

    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(a) or str(tmp_path))
    for name in (f"/nosuch{tmp_path.name}", "./nosuch"):
        with pytest.raises(ModelError, match="no such folder, and not a hub id of the form owner/name"):
            resolve_model_dir(name)
    assert called == []


def test_a_hub_error_is_one_model_error_naming_the_id_and_the_cause(tmp_path, monkeypatch):
    import huggingface_hub

    from audit.models import resolve_model_dir

    def offline(*a, **k):
        raise OSError("offline mode is on")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model_dir("owner/model")
    assert str(err.value) == "--model owner/model: cannot fetch from the hub (OSError: offline mode is on)"


def test_a_relative_folder_resolves_to_its_absolute_path_and_keeps_its_name(tmp_path, monkeypatch):
    from audit.models import resolve_model_dir

    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    name, path = resolve_model_dir("m")
    assert name == "m" and path.is_absolute() and path == (tmp_path / "models" / "m").resolve()


# ---------------------------------------------------------------- fingerprint

def _sha(entries, settings=None):
    """The documented fingerprint by hand: sha256 over "<component>/<file>\\0" + bytes, then memaudit.json's score
    settings as "memaudit.json\\0" + their JSON with sorted keys; its first 16 hex digits."""
    d = hashlib.sha256()
    for rel, data in entries:
        d.update(f"{rel}\0".encode() + data)
    if settings:
        d.update(("memaudit.json\0" + settings).encode())
    return d.hexdigest()[:16]


def test_fingerprint_sorts_a_components_files_whatever_order_the_folder_lists_them(tmp_path, monkeypatch):
    from pathlib import Path

    from audit.models import fingerprint_files

    files = {"unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"W",
             "unet/a.txt": b"t", "unet/notes.md": b"ignored", "unet/old.bin": b"pickle"}
    root = _folder(tmp_path / "m", files)
    listed = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listed(self), reverse=True)))
    expected = _sha([(r, files[r]) for r in ("unet/a.txt", "unet/config.json",
                                             "unet/diffusion_pytorch_model.safetensors")])
    assert fingerprint_files(root) == expected


def test_fingerprint_covers_the_transformer_folder(tmp_path):
    """PixArt's and SD 3.x's denoiser is transformer/: its weights are in the fingerprint, after the scheduler."""
    from audit.models import fingerprint_files

    files = {"scheduler/scheduler_config.json": b"{}", "transformer/config.json": b'{"num_layers": 28}',
             "transformer/diffusion_pytorch_model.safetensors": b"T"}
    root = _folder(tmp_path / "m", files)
    assert fingerprint_files(root) == _sha([(r, files[r]) for r in files])


def test_fingerprint_hashes_the_score_settings_with_sorted_keys_and_their_file_name(tmp_path):
    from audit.models import fingerprint_files

    files = {"unet/config.json": b"{}"}
    a = _folder(tmp_path / "a", files)
    b = _folder(tmp_path / "b", files)
    settings = {"unet_encoder_attention_mask": "bos_and_prompt_tokens", "guidance_geometry_weights": [1.0, 2.0]}
    (a / "memaudit.json").write_text(json.dumps(settings | {"description": "x"}))
    (b / "memaudit.json").write_text(json.dumps(dict(reversed(list(settings.items())))))
    expected = _sha([("unet/config.json", b"{}")],
                    '{"guidance_geometry_weights": [1.0, 2.0], "unet_encoder_attention_mask": "bos_and_prompt_tokens"}')
    assert fingerprint_files(a) == fingerprint_files(b) == expected
    # settings=False (the VAE's fingerprint of memaudit generate): the files alone
    assert fingerprint_files(a, settings=False) == _sha([("unet/config.json", b"{}")])


# ---------------------------------------------------------------- devices and dtypes

def test_auto_device_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    from audit.models import resolve_device

    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert resolve_device("auto") == torch.device(expected)


def test_cuda_devices_up_to_the_last_gpu_are_accepted(monkeypatch):
    from audit.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ModelError) as err:
        resolve_device("cuda:2")
    assert str(err.value) == "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"


def test_device_kind_of_a_gpu_names_its_model_and_other_devices_their_type(monkeypatch):
    from audit.models.base import device_kind

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert device_kind(torch.device("cuda:0")) == "cuda:NVIDIA H200"
    assert device_kind("mps") == "mps"


def test_named_dtypes_map_to_their_torch_types():
    from audit.models import resolve_dtype

    cpu = torch.device("cpu")
    assert [resolve_dtype(n, cpu) for n in ("float32", "float16", "bfloat16", "auto")] == \
        [torch.float32, torch.float16, torch.bfloat16, torch.float32]


def test_load_model_defaults_to_the_auto_device_and_dtype(tiny_model_dir, monkeypatch):
    """load_model's documented defaults reach the adapter: ``auto`` for both (float32 on CPU, bfloat16/float16 on
    a GPU), not a fixed dtype."""
    from audit.models import SD1, load_model

    seen = []
    monkeypatch.setattr(type(SD1), "load", lambda self, name, root, device, dtype: seen.append((device, dtype)))
    load_model(str(tiny_model_dir))
    assert seen == [("auto", "auto")]


# ---------------------------------------------------------------- JSON files, components, identity

def test_default_layers_given_as_one_string_is_refused(tmp_path):
    from audit.models import read_extra

    (tmp_path / "memaudit.json").write_text(json.dumps({"default_layers": "down_blocks.1.attentions.1"}))
    with pytest.raises(ModelError, match=r"default_layers must be a list of layer names \(got str\)"):
        read_extra(tmp_path)


def test_pickled_text_encoder_weights_are_refused_from_the_identity_before_any_load(tmp_path, tiny_model_dir):
    """check_components refuses text_encoder/ without .safetensors as it does unet/: read_identity says so (it loads
    nothing, so diffusers' own error could not)."""
    from audit.models import read_identity

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    for p in (model / "text_encoder").glob("*.safetensors"):
        p.rename(p.with_name("pytorch_model.bin"))
    with pytest.raises(ModelError) as err:
        read_identity(str(model))
    assert str(err.value).startswith(f"--model {model}: text_encoder/ has no .safetensors weights, only pickled ones "
                                     "(text_encoder/pytorch_model.bin), and memaudit never loads pickle: convert "
                                     "them once")


def test_every_missing_component_is_named(tmp_path):
    from audit.models.base import check_components

    root = _folder(tmp_path / "m", {"tokenizer/vocab.json": b"{}", "scheduler/scheduler_config.json": b"{}"})
    with pytest.raises(ModelError) as err:
        check_components("m", root, "StableDiffusionPipeline", ("tokenizer", "text_encoder", "unet", "scheduler"))
    assert str(err.value) == ("--model m: a StableDiffusionPipeline folder missing text_encoder/, unet/ (memaudit "
                              "needs tokenizer, text_encoder, unet, scheduler)")


def test_a_variant_is_named_only_where_its_plain_weights_are_missing(tmp_path):
    from audit.models.base import cannot_load

    root = _folder(tmp_path / "m", {"text_encoder/model.safetensors": b"x", "text_encoder/model.fp16.safetensors": b"x",
                                    "unet/diffusion_pytorch_model.safetensors": b"x"})
    assert str(cannot_load("m", root, OSError("bad"))) == "--model m: cannot load (OSError: bad)"
    (root / "unet" / "diffusion_pytorch_model.safetensors").rename(
        root / "unet" / "diffusion_pytorch_model.bf16.safetensors")
    assert str(cannot_load("m", root, OSError("bad"))).endswith(
        "the folder holds only 'bf16' variant weights: save the pipeline again without variant= (or copy the variant "
        "file to the plain name)")


def test_the_identity_reads_the_folders_scheduler_config_and_memaudit_json(tmp_path, tiny_model_dir):
    from audit.models import read_identity

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "memaudit.json").write_text(json.dumps({"description": "a note"}))
    ident = read_identity(str(model))
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert ident.scheduler_config == sched and sched["num_train_timesteps"] == 1000
    assert ident.extra == {"description": "a note"} and ident.pipeline_class == "StableDiffusionPipeline"


def test_a_model_assembled_without_an_adapter_is_sd1():
    from audit.models import SD1, LoadedModel, adapter_of

    m = LoadedModel("m", None, "fp", None, None, None, {}, None, None, [])
    assert adapter_of(m) is SD1


# ---------------------------------------------------------------- schedulers

def test_ddim_from_config_refuses_a_diffusers_class_that_is_no_scheduler_and_keeps_the_step_count():
    from audit.models.base import ddim_from_config
    from audit.tiny import SD1_SCHEDULER_CONFIG

    with pytest.raises(ModelError, match="scheduler 'UNet2DConditionModel': not a diffusers scheduler class"):
        ddim_from_config({"_class_name": "UNet2DConditionModel"}, 50)
    sch = ddim_from_config(dict(SD1_SCHEDULER_CONFIG, _class_name="PNDMScheduler"), 25)
    assert sch.timesteps.tolist() == list(range(961, 0, -40))  # leading spacing 1000 // 25 = 40, offset 1


def test_a_scheduler_config_without_num_train_timesteps_is_accepted():
    """diffusers' default is 1000 steps, inside the bounds."""
    from audit.models.base import check_scheduler_config

    assert check_scheduler_config({}) is None


def test_sd2_refuses_a_flow_matching_scheduler_with_the_reason():
    from audit.models.sd2 import configured_scheduler

    with pytest.raises(ModelError, match="scheduler FlowMatchEulerDiscreteScheduler: a flow-matching schedule"):
        configured_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"}, 50)


# ---------------------------------------------------------------- SD 1.x / 2.x adapters

def test_a_loaded_model_is_in_eval_mode_without_gradients(tiny_model):
    for module in (tiny_model.text_encoder, tiny_model.unet):
        assert not module.training and not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())


def test_a_loaded_models_fingerprint_counts_its_score_settings_as_its_identity_does(tmp_path, tiny_model_dir):
    from audit.models import fingerprint_files, load_model, read_identity

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "memaudit.json").write_text(json.dumps({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    loaded = load_model(str(model), "cpu", "float32")
    assert loaded.fingerprint == read_identity(str(model)).fingerprint != fingerprint_files(model, settings=False)


def test_sd2_is_told_by_a_bang_pad_token_in_special_tokens_map_alone(tmp_path):
    from audit.models import SD2

    root = _folder(tmp_path / "m", {"unet/config.json": b"{}",
                                    "tokenizer/tokenizer_config.json": b'{"model_max_length": 77}',
                                    "tokenizer/special_tokens_map.json": b'{"pad_token": "!"}'})
    assert SD2.matches(root) is True
    (root / "tokenizer" / "special_tokens_map.json").write_text('{"pad_token": "<|endoftext|>"}')
    assert SD2.matches(root) is False


# ---------------------------------------------------------------- batch size from probes

def test_batch_size_for_memory_without_a_measured_cost_is_the_cap():
    from audit.scorers import batch_size_for_memory

    assert batch_size_for_memory(1 << 30, 0.0, cap=64) == 64 and batch_size_for_memory(1 << 30, -5.0) == 2048


def test_batch_size_from_probes_keeps_its_cap_and_never_credits_a_negative_fixed_part():
    from audit.scorers import batch_size_from_probes

    mib, gib = 1 << 20, 1 << 30
    small, large = (4, gib + 80 * mib), (16, gib + 320 * mib)  # 1 GiB fixed + 20 MiB a prompt
    assert batch_size_from_probes(40 * gib, small, large, cap=256) == 256  # 1397 fits -> 1024, capped at 256
    # 10 MiB a prompt and a fixed part of 10 - 4 x 10 = -30 MiB (noise): counted as 0, so with 1800 MiB available
    # 0.7 x 1800 / 10 = 126 -> 64 (crediting the 30 MiB would say 0.7 x 1830 / 10 = 128.1 -> 128)
    assert batch_size_from_probes(1800 * mib, (4, 10 * mib), (16, 130 * mib)) == 64


def test_auto_batch_size_counts_what_the_probes_allocate_and_the_allocators_unused_cache(tiny_model, monkeypatch):
    """torch.cuda's counters replaced by a GPU holding 2048 MiB of weights before the probes, each probe batch of n
    prompts allocating 100 + 10 n MiB more, 1500 MiB free and 500 MiB cached but unused (reserved 2548 MiB):
    available = 1500 + 2548 - 2048 = 2000 MiB; per = 10 MiB, fixed = 100 MiB: 0.7 x 1900 / 10 = 133 -> 128.
    (Counting the weights as the probes' would leave nothing: 1; the free memory alone: 0.7 x 1400 / 10 -> 64.)"""
    import dataclasses

    from audit.scorers import ScoreConfig, Scorer

    mib = 1 << 20
    weights = 2048 * mib
    fake = {"peak": weights}
    s = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers)))
    s.model = dataclasses.replace(tiny_model, device=torch.device("cuda"))

    def score(prompts, tokens=None):
        fake["peak"] = weights + (100 + 10 * len(prompts)) * mib

    monkeypatch.setattr(s, "score", score)
    for name, fn in {"synchronize": lambda: None, "reset_peak_memory_stats": lambda: fake.update(peak=weights),
                     "memory_allocated": lambda: weights, "max_memory_allocated": lambda: fake["peak"],
                     "memory_reserved": lambda: weights + 500 * mib,
                     "mem_get_info": lambda: (1500 * mib, 16 << 30)}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    assert s.auto_batch_size() == 128 and s.chosen_batch_size == 128


# ---------------------------------------------------------------- audit.faults

def test_a_watchdog_counts_the_stall_from_when_it_is_entered():
    """Made at t = 0 and entered at t = 10 with a 5 s timeout: not stalled at t = 10 nor t = 15, stalled after (its
    polling thread is idle here: the rule alone, on a fake clock)."""
    from audit.faults import StallWatchdog

    now = [0.0]
    w = StallWatchdog(5, clock=lambda: now[0])
    w._watch = lambda: None
    now[0] = 10.0
    with w:
        assert not w.stalled()
        now[0] = 15.0
        assert not w.stalled()
        now[0] = 15.5
        assert w.stalled()
    assert not w.fired


def test_resume_hint_names_the_run_folder_when_one_was_chosen(monkeypatch):
    import audit.faults
    from audit.faults import resume_hint

    monkeypatch.setitem(audit.faults.RUN_FOLDER, "path", None)
    assert resume_hint() == "rerun the same command with the same --out to resume"
    monkeypatch.setitem(audit.faults.RUN_FOLDER, "path", "runs/2024-01-01-120000")
    assert resume_hint() == "rerun with --out runs/2024-01-01-120000 to resume"


class _PipeStdout:
    """A stand-in for sys.stdout writing to a pipe's write end."""

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def test_stdout_is_closed_only_once_the_pipes_reader_went_away(monkeypatch):
    import os
    import sys

    from audit.faults import stdout_is_closed

    r, w = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdout", _PipeStdout(w))
        assert stdout_is_closed() is False  # writable, reader there
        os.close(r)
        r = None
        assert stdout_is_closed() is True
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)


def test_stdout_closed_exits_141_with_stdout_pointed_at_devnull(monkeypatch):
    import os
    import sys

    from audit.faults import stdout_closed

    r, w = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdout", _PipeStdout(w))
        with pytest.raises(SystemExit) as err:
            stdout_closed()
        assert err.value.code == 141
        os.write(w, b"lost")  # goes to /dev/null: the pipe has no writer left, its reader sees the end
        assert os.read(r, 10) == b""
    finally:
        os.close(r)
        os.close(w)


def test_a_home_path_that_is_not_there_is_no_such_folder_not_a_hub_id(tmp_path, monkeypatch):
    """``~/models`` has one slash like owner/name: with no such folder under $HOME it was sent to the hub, whose
    answer (HFValidationError about repo id characters) hid the mistyped path. It is a path: "no such folder"."""
    import huggingface_hub

    from audit.models import resolve_model_dir

    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(a) or str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        resolve_model_dir("~/nosuch")
    assert str(err.value) == "--model ~/nosuch: no such folder, and not a hub id of the form owner/name"
    assert called == []
    (tmp_path / "nosuch").mkdir()  # once there, the home path is the folder
    assert resolve_model_dir("~/nosuch") == ("~/nosuch", (tmp_path / "nosuch").resolve())


def test_a_text_encoder_whose_config_says_nothing_of_a_mask_gets_none(tiny_model):
    """As StableDiffusionPipeline.encode_prompt: without use_attention_mask in the config (CLIP's default) the text
    encoder sees the ids alone, so the padding positions attend to the padding before them."""
    from audit.models import SD1

    assert not hasattr(tiny_model.text_encoder.config, "use_attention_mask")
    tokens = SD1.tokenize(tiny_model, ["a red cat", "a photo of a dog on the beach"])
    ids, mask = torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)
    with torch.no_grad():
        ours = SD1.encode(tiny_model, tokens)
        without = tiny_model.text_encoder(ids)[0]
        with_mask = tiny_model.text_encoder(ids, attention_mask=mask)[0]
    assert not torch.equal(with_mask, without)  # the test can tell the two apart
    torch.testing.assert_close(ours, without, rtol=0, atol=0)


def test_detect_family_asks_sd2_before_sd1_for_their_shared_pipeline_class(tmp_path):
    """Families registered later are asked first: an SD 2.x folder (linear projections) is SD 2.x, not the SD 1.x
    that would accept any StableDiffusionPipeline folder; without the sign it is SD 1.x."""
    from audit.models import SD1, SD2, detect_family

    files = {"model_index.json": b'{"_class_name": "StableDiffusionPipeline"}', "tokenizer/vocab.json": b"{}",
             "text_encoder/model.safetensors": b"x", "unet/diffusion_pytorch_model.safetensors": b"x",
             "unet/config.json": b'{"use_linear_projection": true}', "scheduler/scheduler_config.json": b"{}"}
    sd2 = _folder(tmp_path / "sd2", files)
    sd1 = _folder(tmp_path / "sd1", files | {"unet/config.json": b'{"use_linear_projection": false}'})
    assert detect_family(sd2) == (SD2, "StableDiffusionPipeline")
    assert detect_family(sd1) == (SD1, "StableDiffusionPipeline")


def test_a_stalled_block_that_fails_on_its_own_keeps_its_own_error(monkeypatch):
    """The stall message replaces only a normal end or the watchdog's own interrupt: another error of the block (a
    unit's ValueError) after a stall was recorded propagates as it is."""
    import time

    import audit.faults
    from audit.faults import StallWatchdog

    monkeypatch.setattr(audit.faults.signal, "pthread_kill", lambda ident, sig: None)
    now = [0.0]
    with pytest.raises(ValueError, match="a unit's own error"):
        with StallWatchdog(0.4, clock=lambda: now[0]) as watchdog:
            now[0] = 1.0
            deadline = time.monotonic() + 30
            while not watchdog.fired and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watchdog.fired
            raise ValueError("a unit's own error")
