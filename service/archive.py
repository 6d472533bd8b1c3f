"""Build one TorchServe archive (.mar) per committed model folder.

The archive holds the handler module, the model folder's files (weights in safetensors, config,
tokenizer files, model card) and a model-config.yaml: the task's settings below, with the limits of
the model's own config.json (its "limits") where it sets lower ones. The handlers import the engine from the
installed `rnnserve` package, so the worker's Python must be the project's environment (the launcher sees to that).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rnnserve.models.folder import is_model_folder, model_files, name_problem
from rnnserve.paths import MODEL_STORE, MODELS_DIR

log = logging.getLogger(__name__)

HANDLERS_DIR = Path(__file__).resolve().parent / "handlers"
HANDLER_FILES = {"lm": HANDLERS_DIR / "lm_handler.py", "translation": HANDLERS_DIR / "translation_handler.py",
                 "lm-naive": HANDLERS_DIR / "naive_lm_handler.py",
                 "lm-naive-modules": HANDLERS_DIR / "naive_lm_handler.py"}

# Per-task TorchServe settings. Why these numbers:
# - batchSize is the number of live sequences one worker decodes together. A recurrent step costs
#   nearly the same for 1 or 64 rows on this CPU, so a wide batch is almost free throughput.
# - maxBatchDelay 1 ms: with continuous batching a new request joins at the next step; 0 is
#   silently replaced by TorchServe's default of 100 ms, which would add 100 ms to every first token.
# - responseTimeout applies per streamed frame, not per request: a step lasts ~30 ms, so 60 s only
#   trips on a hung worker.
# - one worker: a second process on 2 cores would halve each one's threads and duplicate the model.
MODEL_CONFIGS: dict[str, dict] = {
    "lm": {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 64,
        "maxBatchDelay": 1,
        "responseTimeout": 60,
        "continuousBatching": True,
        "handler": {
            "max_batch_size": 64,  # = batchSize: every admitted request gets a row at once
            "max_tokens_limit": 2048,
            "max_prompt_chars": 8192,
            # A step decodes until this budget is spent (prefill included). TorchServe's round trip between
            # steps costs ~9 ms at 32 streams, and every frame costs the frontend, the gateway and the
            # client CPU: 60 ms steps gave ~1.3x the tokens/s of 30 ms at 32 streams with the same time to
            # first token, because a new request waits for the running step only once (BENCHMARKS.md).
            "target_step_ms": 60,
            # a call that admits new requests first runs a short step of its own (their prefill and one
            # token), so that their first token leaves with that call instead of a whole step later
            "admit_step_ms": 0,
            # requests reaching an idle engine wait up to this long for the rest of their burst, which comes with
            # the next calls: one prefill then reads them all (a recurrent prefill costs about the same for one
            # prompt as for 64), where the first call's few would make the others wait for theirs. Ends as soon
            # as a call brings no new request or every row is taken; a lone request waits one round trip.
            "admit_gather_ms": 30,
            # the long step runs in a background thread between calls, hiding TorchServe's round trip
            # (streaming.py); false runs every step inside the call
            "overlap_steps": True,
            "max_tokens_per_step": 32,
            # the least time between two frames of a stream (its first goes out at once): a step whose engine
            # made its tokens early keeps stepping until then, so a fast engine sends bigger frames, not more
            # of them (every frame costs TorchServe's frontend, the gateway and the client the same CPU).
            # Equal to the step budget, it changes nothing where the engine fills the budget itself.
            "frame_interval_ms": 60,
            # ... grown with the streams in flight: 3 ms per stream past 20 (32 streams: 96 ms, 64: 192 ms), so that
            # all streams together send about 330 frames/s, up to 250 ms between two frames of a stream. On a small
            # CPU machine the relay of every frame slows the engine beside it: 3 ms gave the int8 stack 0.06 more of
            # its raw engine's tokens/s than 2 ms (500 frames/s) at 32 and 64 streams (BENCHMARKS.md). A new request
            # waits for the running interval: a call that brings new requests ends the one after it at once, so
            # that they wait for one interval at most (streaming.py)
            "frame_interval_per_stream_ms": 3,
            "max_frame_interval_ms": 250,
            # a floor on each step's duration (0: none); the test suite sets it with max_tokens_per_step 1
            # (RNNSERVE_MIN_STEP_MS, RNNSERVE_MAX_TOKENS_PER_STEP) for streams slow on any machine
            "min_step_ms": 0,
            # tokens of each prompt read per step (0: no limit); a longer prompt is read across steps, so
            # the running streams keep their pace. A prefill costs about one timestep per token of its
            # longest prompt, whatever the batch: with models/lm-shakespeare, one torch thread and native
            # kernels, 64 tokens of one prompt take ~40-58 ms on this 2-core CPU and 128 ~100 ms. 256 keeps
            # a typical prompt inside the step that admits it (its first token does not wait), and bounds
            # the stall a long prompt causes the other streams to a few hundred ms, where an 8,192-character
            # prompt read whole stalled every stream for ~3-5 s. Texts to score are read alike, up to 16 per step.
            "prefill_chunk_tokens": 256,
            # decode LSTM steps with folded weights, a few GEMMs per token (rnnserve/models/decode.py):
            # 1.2-1.45x the tokens/s at batch 32 and 1.9x at batch 1 on this CPU; false steps the modules
            "folded_step": True,
            # int8 GEMMs in the folded step (CPU only): on where the model's config.json says its quality
            # check passed ("int8": true, from `rnnserve evaluate --int8`)
            "int8": False,
            # one thread per worker: on a small CPU machine the worker shares the cores with TorchServe's
            # frontend and the gateway, and two intra-op threads then fight them (BENCHMARKS.md)
            "torch_threads": 1,
            "half_precision": True,  # GPU only; CPU always runs fp32
            # TorchServe's worker reads each call's message through a buffer and skips its per-call log line
            # (service/handlers/worker_io.py); false leaves TorchServe's worker as it is
            "trim_worker_io": True,
        },
    },
    # Benchmark baselines only (rnnserve bench): one request at a time, a frame per token, the same
    # thread setting as "lm"; with the folded decode step, and with the model's modules.
    "lm-naive": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1, "responseTimeout": 60,
                 "handler": {"torch_threads": 1, "folded_step": True}},
    "lm-naive-modules": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1,
                         "responseTimeout": 60, "handler": {"torch_threads": 1, "folded_step": False}},
    # A translation step decodes one token for every beam of every sentence: 256 rows hold e.g.
    # 64 sentences at beam 4. batchSize counts requests (each may carry many sentences); sentences
    # beyond the rows wait inside the engine, in arrival order.
    "translation": {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 64,
        "maxBatchDelay": 1,
        "responseTimeout": 60,
        "continuousBatching": True,
        "handler": {
            "max_rows": 256,
            "max_texts": 64,
            "max_text_chars": 1000,
            "max_source_tokens": 256,
            "max_tokens_limit": 256,
            "target_step_ms": 30,  # decoder steps per TorchServe round trip: as many as fit in 30 ms
            "overlap_steps": True,
            # new sentences are encoded by the background step, not inside the call that admits them:
            # the call returns at once, so TorchServe's round trip overlaps their prefill
            "step_on_admit": False,
            # the decoder step in exact int8 (CPU only, GRU decoders): on where the model's config.json says its
            # quality check passed ("int8": true, from `rnnserve evaluate --int8`)
            "int8": False,
            "torch_threads": 1,
            "half_precision": True,
            "trim_worker_io": True,  # as for "lm"
        },
    },
}


# The GPU worker profile: `rnnserve archive --gpu` (or RNNSERVE_ARCHIVE_PROFILE=gpu, which the launcher's rebuild
# of stale archives also reads) lays these settings over MODEL_CONFIGS. They are starting points, not measured
# on a GPU: measure with `rnnserve bench engine|lm|translation` on the GPU machine before trusting or tuning them.
# - 1,024 rows per worker: the batch the issue targets; an LSTM step that wide is still a few small GEMMs.
#   The gateway admits RNNSERVE_MAX_RUNNING_PER_MODEL generations per model (64 by default): raise it to match.
# - cuda_graphs: each decode step replays one CUDA graph per batch bucket (rnnserve/models/graphs.py),
#   captured at load. The translation handler has no graphed step yet, so it gets no such key.
# - half_precision: fp16 weights and states (the handlers' default on a GPU already).
# - translation batchSize counts requests: 256 fill the 1,024 rows at beam 4, one sentence each.
# - torch_threads, target_step_ms and max_tokens_per_step stay the CPU's (torch_threads is only applied on CPU).
# - prefill_chunk_tokens 2,048: a GPU reads a prompt token in far less time than this CPU (one cuDNN time step
#   for the whole packed batch), so a chunk 8x the CPU's is a guess at a similar stall; unmeasured.
GPU_SETTINGS: dict[str, dict] = {
    "lm": {"batchSize": 1024,
           "handler": {"max_batch_size": 1024, "cuda_graphs": True, "half_precision": True,
                       "prefill_chunk_tokens": 2048,
                       # the exact int8 step runs on a GPU too (torch._int_mm), but its speed there is
                       # unmeasured: `make gpu-check` measures it; RNNSERVE_INT8=1 turns it on
                       "int8": False}},
    # the int8 decoder step is a CPU path (the engine ignores it on a GPU)
    "translation": {"batchSize": 256, "handler": {"max_rows": 1024, "half_precision": True, "int8": False}},
}
PROFILES = ("cpu", "gpu")
PROFILE_ENV = "RNNSERVE_ARCHIVE_PROFILE"


def archive_profile(profile: str | None = None) -> str:
    """The profile asked for, else RNNSERVE_ARCHIVE_PROFILE's, else "cpu"."""
    profile = profile or os.environ.get(PROFILE_ENV) or "cpu"
    if profile not in PROFILES:
        raise ValueError(f"archive profile must be one of {list(PROFILES)}, not {profile!r}")
    return profile


# a model config's "limits" (the gateway's names) -> the handler's settings they bound
HANDLER_LIMITS = {"lm": {"max_tokens": "max_tokens_limit", "max_prompt_chars": "max_prompt_chars"},
                  "translation": {"max_tokens": "max_tokens_limit", "max_texts": "max_texts",
                                  "max_text_chars": "max_text_chars"}}


def model_config(task: str, config: dict, profile: str = "cpu") -> dict:
    """The model-config.yaml of an archive: the task's settings (with the GPU profile's over them when asked),
    with the model's own lower limits (read as the gateway reads them, so both enforce the same numbers)."""
    from rnnserve.service.gateway.registry import model_limits

    out = json.loads(json.dumps(MODEL_CONFIGS[task]))  # a deep copy
    gpu = GPU_SETTINGS.get(task, {}) if archive_profile(profile) == "gpu" else {}
    out.update({k: v for k, v in gpu.items() if k != "handler"})
    handler = out["handler"]
    handler.update(gpu.get("handler", {}))
    limits = HANDLER_LIMITS.get(config.get("task"), {})
    if limits:
        lowered = model_limits(config["task"], config)
        for key, setting in limits.items():
            if setting in handler:
                handler[setting] = min(handler[setting], lowered[key])
    if "int8" in handler and "int8" not in gpu.get("handler", {}):
        handler["int8"] = config.get("int8") is True
    return out


def model_folders(models_dir: Path) -> list[tuple[str, Path, str]]:
    """(served name, folder, task) for every folder under models_dir holding a complete model. The served name
    is config.json's "name" (`--name` of `rnnserve train` / `import`), else the folder's name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise SystemExit(f"no models folder {models_dir} (RNNSERVE_MODELS_DIR)")
    found, seen = [], {}
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if not is_model_folder(folder):
            continue
        config = json.loads((folder / "config.json").read_text())
        task = config.get("serving", config.get("task"))  # "serving" picks another handler (benchmarks)
        if task not in HANDLER_FILES:
            continue
        name = config.get("name") or folder.name
        if name_problem(name):
            raise SystemExit(f"{folder / 'config.json'}: {name_problem(name)}")
        if name in seen:
            raise SystemExit(f"{seen[name]} and {folder} are both served as {name!r}: give one another \"name\" "
                             f"in its config.json")
        seen[name] = folder
        found.append((name, folder, task))
    return found


def served_folders(models_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The models a stack serves, by served name: every model folder of models_dir, or the ones `names` picks
    (RNNSERVE_MODELS). Archives in the model store that no folder names are left alone, not served."""
    folders = {name: folder for name, folder, _task in model_folders(models_dir)}
    if not folders:
        raise SystemExit(f"no model folders in {models_dir}")
    missing = [n for n in names or [] if n not in folders]
    if missing:
        raise SystemExit(f"no model folder in {models_dir} is served as {missing} (there are {sorted(folders)})")
    return {n: folders[n] for n in names} if names else folders


def build_archive(name: str, folder: Path, task: str, model_store: Path, profile: str = "cpu") -> Path:
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "model-config.yaml"
        config = json.loads((folder / "config.json").read_text())
        config_file.write_text(yaml.safe_dump(model_config(task, config, profile), sort_keys=False))
        extra = ",".join(str(p) for p in model_files(folder))
        cmd = [_archiver(), "--model-name", name, "--version", "1.0",
               "--handler", str(HANDLER_FILES[task]), "--extra-files", extra, "--config-file", str(config_file),
               "--export-path", str(model_store), "--force"]
        # the archiver stages the files in $TMPDIR/<model name>: a shared /tmp/<name> would mix two builds of one
        # name at once (several stacks, test sessions or worktrees on one machine) and fail or pack the wrong files
        subprocess.run(cmd, check=True, env=dict(os.environ, TMPDIR=tmp))
    path = model_store / f"{name}.mar"
    log.info("built %s (%s profile)", path, profile)
    return path


def _archiver() -> str:
    beside = Path(sys.executable).with_name("torch-model-archiver")  # the project's environment first
    return str(beside) if beside.exists() else "torch-model-archiver"


def stale_archives(models_dir: str | Path | None = None, model_store: str | Path | None = None) -> list[str]:
    """Models whose archive is missing or older than its folder's files or the handler code."""
    models_dir = Path(models_dir) if models_dir else MODELS_DIR
    model_store = Path(model_store) if model_store else MODEL_STORE
    code = max(p.stat().st_mtime for p in [*HANDLERS_DIR.glob("*.py"), Path(__file__)])
    stale = []
    for name, folder, _task in model_folders(models_dir):
        mar = model_store / f"{name}.mar"
        newest = max([code, *(p.stat().st_mtime for p in model_files(folder))])
        if not mar.exists() or mar.stat().st_mtime < newest:
            stale.append(name)
    return stale


def build_archives(models_dir: str | Path | None = None, model_store: str | Path | None = None,
                   profile: str | None = None) -> list[Path]:
    """Every model folder's archive; `profile` "gpu" for GPU workers (default: RNNSERVE_ARCHIVE_PROFILE, else
    "cpu"). Switching profiles needs this call (`rnnserve archive`): the launcher only rebuilds stale archives."""
    models_dir = Path(models_dir) if models_dir else MODELS_DIR
    model_store = Path(model_store) if model_store else MODEL_STORE
    profile = archive_profile(profile)
    folders = model_folders(models_dir)
    if not folders:
        raise SystemExit(f"no model folders in {models_dir}")
    return [build_archive(name, folder, task, model_store, profile) for name, folder, task in folders]
