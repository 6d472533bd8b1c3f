"""`rnnserve bench`: serving throughput and latency against baselines measured in the same run.

    rnnserve bench lm            # raw engine (the ceiling) vs naive handlers vs full stack
    rnnserve bench engine        # the engine alone: oneDNN vs native kernels, module vs folded decode step
    rnnserve bench translation   # raw engine vs full stack, greedy and beam 4
    rnnserve bench translation --int8   # the raw engine's fp32 decoder step vs the int8 one
    rnnserve bench cpu           # CPU per request and per streamed event of each process of the stack

Every figure of a table comes from the same run on the same model, prompts and machine; quote the
ratios (this machine is noisy). The LM's streaming clients are asyncio tasks on loopback over the gateway's
lean HTTP client (`--client aiohttp`: aiohttp's); translation's use aiohttp.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import torch

from rnnserve.bench.soak import cpu_seconds
from rnnserve.bench.sse import StreamRead, read_stream, read_stream_lines, run_client
from rnnserve.bench.warmup import MAX_BURSTS, jvm_pid, warm_until_compiled
from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.translation_engine import TranslationEngine, TranslationParams
from rnnserve.models.decode import int8_gemm_path
from rnnserve.models.folder import copy_model_folder, load_lm, load_translation
from rnnserve.paths import DATA_DIR, MODELS_DIR
from rnnserve.service.archive import MODEL_CONFIGS, PROFILE_ENV, model_config
from rnnserve.service.gateway.torchserve_client import TorchServeClient
from rnnserve.service.stack import start_stack, stop_stack
from rnnserve.training.corpus import read_lines

WARMUP_ROUNDS = 3
PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", "First Citizen:\n", "To be, or not to be", "MENENIUS:\n"]


@dataclass
class Result:
    name: str
    clients: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    units: int = 0  # sentences, for translation
    events: int = 0  # SSE events received
    steal_pct: float | None = None  # CPU the hypervisor took from this machine during the run (measured)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict:
        return {"name": self.name, "clients": self.clients, "tokens_per_s": round(self.tokens_per_s, 1),
                "units_per_s": round(self.units / self.seconds, 2) if self.seconds else 0.0,
                "ttft_p50_ms": _ms(_pct(self.ttft, 50)), "ttft_p99_ms": _ms(_pct(self.ttft, 99)),
                "itl_p50_ms": _ms(_pct(self.itl, 50)), "itl_p99_ms": _ms(_pct(self.itl, 99)), "errors": self.errors,
                "steal_pct": self.steal_pct}


def measured(run: Callable[[], Result]) -> Result:
    """Run one setup and record the share of the machine's CPU time that the hypervisor stole meanwhile.
    These shared machines' speed moves by up to 3x within an hour; steal is the part of it the guest can
    see, and a run with high steal starves the stack's several processes more than the raw engine."""
    cpu0, steal0 = cpu_seconds()
    res = run()
    cpu1, steal1 = cpu_seconds()
    res.steal_pct = round(100 * (steal1 - steal0) / (cpu1 - cpu0), 1) if cpu1 > cpu0 else None
    return res


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


# -- raw engines, in-process ---------------------------------------------------------------------
def raw_lm(engine: LMEngine, clients: int, tokens: int, step_ms: float, name: str = "raw engine") -> Result:
    """All clients' requests admitted at once; steps sized as the handler sizes them."""
    cfg = MODEL_CONFIGS["lm"]["handler"]
    res = Result(name, clients)
    for i in range(clients):
        engine.add(f"r{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=tokens, temperature=0.8, seed=i))
    t0 = time.perf_counter()
    seen: set[str] = set()
    first = True  # the step that admits them all is short, as in the handler
    while engine.has_work():
        s0 = time.perf_counter()
        budget = cfg["admit_step_ms"] if first else step_ms
        outs = engine.step(cfg["max_tokens_per_step"], budget_s=budget / 1000)
        first = False
        now = time.perf_counter()
        dt = now - s0
        for o in outs:
            if o.text and o.request_id not in seen:
                seen.add(o.request_id)
                res.ttft.append(now - t0)
            elif o.text:
                res.itl.extend([dt / len(o.text)] * len(o.text))
            if o.finished:
                res.tokens += o.completion_tokens
    res.seconds = time.perf_counter() - t0
    return res


def raw_translation(engine: TranslationEngine, clients: int, sentences: list[list[int]], beam: int,
                    per_client: int) -> Result:
    """Closed loop: each client keeps one sentence in flight and sends the next when it is done."""
    res = Result(f"raw engine beam {beam}", clients)
    todo = {c: per_client for c in range(clients)}
    nxt = 0
    params = TranslationParams(beam_size=beam)

    def send(c: int) -> None:
        nonlocal nxt
        engine.add(f"{c}:{nxt}", [sentences[nxt % len(sentences)]], params)
        nxt += 1
        todo[c] -= 1

    t0 = time.perf_counter()
    starts: dict[str, float] = {}
    for c in range(clients):
        starts[f"{c}:{nxt}"] = time.perf_counter()
        send(c)
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                res.units += 1
                res.tokens += o.completion_tokens
                res.ttft.append(time.perf_counter() - starts.pop(o.request_id))
                c = int(o.request_id.split(":")[0])
                if todo[c]:
                    starts[f"{c}:{nxt}"] = time.perf_counter()
                    send(c)
    res.seconds = time.perf_counter() - t0
    return res


# -- through HTTP ------------------------------------------------------------------------------------
CLIENTS = ("lean", "aiohttp")  # the LM's load generators (http_lm)


def _count(res: Result, got: StreamRead) -> None:
    res.events += got.events
    res.ttft += [] if got.ttft is None else [got.ttft]
    res.itl += got.itl
    res.errors += got.error
    if got.finished:
        res.tokens += got.completion_tokens
        res.units += 1


async def _stream_one(session: aiohttp.ClientSession, url: str, body: bytes, res: Result) -> None:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            res.errors += 1
            await r.read()
            return
        _count(res, await read_stream(r, t0))


async def _stream_lean(client: TorchServeClient, body: bytes, res: Result) -> None:
    t0 = time.perf_counter()
    r = await client.post("/v1/generate", body, {})
    try:
        if r.status != 200:
            res.errors += 1
            await r.text()
            return
        _count(res, await read_stream_lines(r, t0))
    finally:
        r.release()


async def _health(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(f"{url}/healthz") as r:
        await r.read()


async def http_lm(url: str, model: str, name: str, clients: int, tokens: int, connect_first: bool = True,
                  client: str = "lean") -> Result:
    """`clients` streamed generations at once. The load generator shares the cores with the stack, and what it
    spends comes out of the stack's figures, so it should cost as little per request and event as it can:
    `lean` is the gateway's own client of TorchServe (httptools' parser, a line per read), which takes about
    0.6-0.7x the CPU of `aiohttp` per request and event (BENCHMARKS.md). The bodies are encoded before the clock
    starts, as the raw engine's requests are queued before its clock. With `connect_first` each client opens its
    connection before the clock too, as a service's clients (or the balancer in front of it) keep theirs open:
    aiohttp takes 12-26 ms to open 32-64 connections before its first request leaves."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}")
    res = Result(name, clients)
    bodies = [json.dumps({"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                          "temperature": 0.8, "seed": i, "stream": True}).encode() for i in range(clients)]
    if client == "lean":
        lean = TorchServeClient(url, connect_timeout_s=30, read_timeout_s=600, max_line_bytes=1 << 20,
                                max_idle=clients)
        try:
            if connect_first:  # one connection per client, in the pool for the burst
                await lean.connect(clients)
            t0 = time.perf_counter()
            await asyncio.gather(*(_stream_lean(lean, body, res) for body in bodies))
            res.seconds = time.perf_counter() - t0
        finally:
            await lean.close()
        return res
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients + 4)) as session:
        if connect_first:  # one connection per client, kept alive in the pool for the burst
            await asyncio.gather(*(_health(session, url) for _ in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(_stream_one(session, f"{url}/v1/generate", body, res) for body in bodies))
        res.seconds = time.perf_counter() - t0
    return res


async def http_translation(url: str, model: str, clients: int, texts: list[str], beam: int,
                           per_client: int) -> Result:
    res = Result(f"full stack beam {beam}", clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients + 4)) as session:
        async def client_loop(ci: int) -> None:
            for j in range(per_client):
                text = texts[(ci * per_client + j) % len(texts)]
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/translate",
                                        json={"model": model, "text": text, "beam_size": beam}) as r:
                    body = await r.json()
                if r.status != 200:
                    res.errors += 1
                    continue
                res.ttft.append(time.perf_counter() - t0)
                res.units += 1
                res.tokens += body["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        res.seconds = time.perf_counter() - t0
    return res


# -- reports --------------------------------------------------------------------------------------
def summarize(runs: list[list[Result]], unit: str, baselines: dict[str, int]) -> list[dict]:
    """One row per setup from repeated runs of one level: the median of every figure, and each ratio as
    the median of the per-run ratios (a run measures all setups back to back, so its ratio is the least
    disturbed by the machine's drift). Prints the level's table."""
    rows = []
    for k in range(len(runs[0])):
        per_run = [run[k].row() for run in runs]
        row = {"name": per_run[0]["name"], "clients": per_run[0]["clients"], "runs": len(runs)}
        for key in per_run[0]:
            if key not in row:
                m = _median([r[key] for r in per_run])
                row[key] = round(m, 2) if isinstance(m, float) else m  # an even count averages two
        for name, b in baselines.items():
            ratios = [run[k].row()[unit] / run[b].row()[unit] for run in runs]
            row[name] = round(_median(ratios), 2)
            row[f"{name}_per_run"] = [round(r, 3) for r in ratios]  # in the JSON (--out), not the table
        rows.append(row)
    print_table(rows, ["name", "clients", unit, "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                       *baselines, "errors", "steal_pct"])
    return rows


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def print_table(rows: list[dict], cols: list[str]) -> None:
    """A markdown table of `cols`; "-" where a row has no value."""
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in cols) + " |", flush=True)


# the naive baselines' archives (service/archive.py) and their names in the tables
NAIVE = {"lm-naive": "naive handler", "lm-naive-modules": "naive, module step"}


INT8_LM = "lm-shakespeare-int8"  # the LM again, served with the int8 step (bench lm --int8)


def _bench_models_dir(tmp: Path, names: list[str], naive: bool, int8: bool = False) -> Path:
    models = tmp / "models"
    models.mkdir()
    for name in names:
        copy_model_folder(MODELS_DIR / name, models / name)
    variants = {b: {"serving": b} for b in (NAIVE if naive else ())}  # the LM under the naive handler's archives
    if int8:  # the committed model in fp32 beside a copy in int8
        variants |= {"lm-shakespeare": {"int8": False}, INT8_LM: {"int8": True}}
    for name, change in variants.items():
        if name in names:  # a model already copied: its config changed in place
            cfg = json.loads((models / name / "config.json").read_text())
            (models / name / "config.json").write_text(json.dumps({**cfg, **change}))
            continue
        copy_model_folder(MODELS_DIR / "lm-shakespeare", models / name, **change)
    return models


def gpu_engine() -> LMEngine:
    """The LM's engine on the GPU as the GPU profile's worker builds it (service/archive.py's GPU_SETTINGS over the
    model's config: fp16, CUDA graphs, 1,024 rows), for `bench lm --gpu`'s raw engine. Built once: capturing its
    graphs is not part of a run."""
    from rnnserve.service.handlers.lm_handler import LanguageModelHandler

    folder = MODELS_DIR / "lm-shakespeare"
    cfg = model_config("lm", json.loads((folder / "config.json").read_text()), "gpu")["handler"]
    device = torch.device("cuda")
    loaded = load_lm(folder, device=device, dtype=torch.float16 if cfg.get("half_precision") else torch.float32)
    return LanguageModelHandler._engine(loaded, cfg, device)


def bench_lm(concurrency: list[int], tokens: int, out: Path | None, worker_threads: int = 0,
             step_ms: float | None = None, repeat: int = 3, int8: bool = False,
             fresh_connections: bool = False, client: str = "lean", naive: bool = True,
             gpu: bool = False, max_warm_up: int = MAX_BURSTS) -> list[dict]:
    """Raw engine, naive handlers (unless not `naive`) and full stack per level; with `int8`, the raw engine and
    the full stack again with the int8 decode step (a second copy of the model served beside the first), against
    both. The clients connect before each burst's clock starts unless `fresh_connections`; `client` is the load
    generator (http_lm). With `gpu`, the stack's archives take the GPU profile and the raw engine is built as its
    worker builds it (gpu_engine), on the GPU; the admission limits are raised to the largest level. The warm-up
    runs at most `max_warm_up` bursts of the largest level (warmup.py)."""
    if gpu and not torch.cuda.is_available():
        raise SystemExit("bench lm --gpu needs a CUDA GPU, and torch sees none")
    if gpu and int8:
        raise SystemExit("bench lm --gpu measures the GPU profile's step; --int8 is the CPU's comparison")
    if gpu and naive:
        raise SystemExit("bench lm --gpu needs --no-naive: the naive handlers answer one request at a time, and "
                         "hundreds of streams through them would take hours")
    profile = "gpu" if gpu else "cpu"
    baseline_names = NAIVE if naive else {}
    loaded = load_lm(MODELS_DIR / "lm-shakespeare")
    step_ms = step_ms or MODEL_CONFIGS["lm"]["handler"]["target_step_ms"]
    limit = str(max(64, *concurrency))  # the gateway's default admission (64) or the largest level
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**_env(worker_threads), "RNNSERVE_TARGET_STEP_MS": str(step_ms), PROFILE_ENV: profile,
               "RNNSERVE_MAX_RUNNING_PER_MODEL": limit, "RNNSERVE_MAX_WAITING_PER_MODEL": limit}
        stack = start_stack(Path(tmp), models_dir=_bench_models_dir(Path(tmp), ["lm-shakespeare"], naive=naive,
                                                                    int8=int8),
                            extra_env=env, profile=profile)
        try:
            # warm-up: first calls pay one-off costs (allocator, kernels, connections), and TorchServe's
            # JVM compiles its hot paths over the first few thousand frames (warmup.py)
            # the raw engine runs the step the served model runs (fp32 with --int8, which adds int8 beside it)
            served_int8 = loaded.meta.get("int8") is True and not int8
            on_gpu = gpu_engine() if gpu else None
            if on_gpu is not None:
                raw_lm(on_gpu, max(concurrency), 32, step_ms)
            else:
                raw_lm(LMEngine(loaded.model, loaded.tokenizer, int8=served_int8), 4, 32, step_ms)
            for baseline in baseline_names:
                run_client(http_lm(stack.url, baseline, "warm-up", 2, 16, client=client))
            warm = warm_until_compiled(
                lambda: [run_client(http_lm(stack.url, model, "warm-up", max(concurrency), tokens, client=client))
                         for model in ["lm-shakespeare"] + ([INT8_LM] if int8 else [])],
                jvm_pid(stack.processes()), min_bursts=min(WARMUP_ROUNDS, max_warm_up), max_bursts=max_warm_up)
            # each ratio's denominator: its setup's index in `setups`
            k = len(baseline_names)
            baselines = {"vs_raw": 0} | ({"vs_naive": 1, "vs_naive_modules": 2} if naive else {})
            connect = not fresh_connections
            if int8:
                baselines |= {"vs_raw_int8": k + 2, "vs_stack_fp32": k + 1}
            for c in concurrency:
                setups = [lambda c=c: raw_lm(on_gpu if on_gpu is not None else
                                             LMEngine(loaded.model, loaded.tokenizer, max_batch_size=64,
                                                      int8=served_int8), c, tokens, step_ms),
                          *(lambda c=c, m=model, n=label: run_client(http_lm(stack.url, m, n, c, tokens, connect,
                                                                                   client))
                            for model, label in baseline_names.items()),
                          lambda c=c: run_client(http_lm(stack.url, "lm-shakespeare", "full stack", c, tokens,
                                                          connect, client))]
                if int8:
                    setups += [lambda c=c: raw_lm(LMEngine(loaded.model, loaded.tokenizer, max_batch_size=64,
                                                           int8=True),
                                                  c, tokens, step_ms, "raw engine int8"),
                               lambda c=c: run_client(http_lm(stack.url, INT8_LM, "full stack int8", c, tokens,
                                                               connect, client))]
                runs = [[measured(setup) for setup in setups] for _ in range(repeat)]
                rows += summarize(runs, "tokens_per_s", baselines)
        finally:
            stop_stack(stack)
    _write(out, {"lm": rows, "tokens": tokens, "threads": torch.get_num_threads(), "worker_threads": worker_threads,
                 "step_ms": step_ms, "repeat": repeat, "int8": int8, "fresh_connections": fresh_connections,
                 "client": client, "naive": naive, "warm_up": warm, "profile": profile})
    return rows


def _env(worker_threads: int) -> dict:
    """Stack environment; the raw engine in this process gets the workers' thread count, so that the
    ceiling and the stack run the same kernels."""
    env = {"RNNSERVE_REQUEST_TIMEOUT_S": "900"}
    if worker_threads:
        env["RNNSERVE_WORKER_THREADS"] = str(worker_threads)
        torch.set_num_threads(worker_threads)
    return env


def bench_translation(concurrency: list[int], beams: list[int], per_client: int, out: Path | None,
                      worker_threads: int = 0, repeat: int = 3, int8: bool = False) -> list[dict]:
    """Raw engine (as served) against the full stack; with `int8`, the raw engine with the fp32 decoder step
    against the int8 one instead (no stack)."""
    tr = load_translation(MODELS_DIR / "translate-de-en")
    texts = read_lines(DATA_DIR / "multi30k" / "raw" / "test_2016_flickr.de.gz")  # raw, cased, as clients send
    ids = [tr.src.encode(t) for t in texts]
    served_int8 = tr.meta.get("int8") is True
    rows = []
    if int8:
        if worker_threads:
            torch.set_num_threads(worker_threads)
        raw_translation(TranslationEngine(tr.model, int8=True), 4, ids, 4, 2)  # warm-up
        for beam in beams:
            for c in concurrency:
                setups = [lambda c=c, b=beam, q=q: _named(raw_translation(TranslationEngine(tr.model, int8=q), c, ids,
                                                                          b, per_client), "int8" if q else "fp32")
                          for q in (False, True)]
                runs = [[measured(setup) for setup in setups] for _ in range(repeat)]
                rows += summarize(runs, "units_per_s", {"vs_fp32": 0})
        _write(out, {"translation_int8": rows, "per_client": per_client, "repeat": repeat,
                     "threads": torch.get_num_threads()})
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), models_dir=_bench_models_dir(Path(tmp), ["translate-de-en"], naive=False),
                            extra_env=_env(worker_threads))
        try:
            raw_translation(TranslationEngine(tr.model, int8=served_int8), 4, ids, 4, 2)  # warm-up
            warm = warm_until_compiled(  # until TorchServe's JVM has compiled its hot paths (warmup.py)
                lambda: run_client(http_translation(stack.url, "translate-de-en", max(concurrency), texts,
                                                    max(beams), 1)),
                jvm_pid(stack.processes()), min_bursts=WARMUP_ROUNDS)
            for beam in beams:
                for c in concurrency:
                    setups = [lambda c=c, b=beam: raw_translation(TranslationEngine(tr.model, int8=served_int8), c,
                                                                  ids, b, per_client),
                              lambda c=c, b=beam: run_client(http_translation(stack.url, "translate-de-en", c, texts,
                                                                               b, per_client))]
                    runs = [[measured(setup) for setup in setups] for _ in range(repeat)]
                    rows += summarize(runs, "units_per_s", {"vs_raw": 0})
        finally:
            stop_stack(stack)
    _write(out, {"translation": rows, "per_client": per_client, "repeat": repeat, "warm_up": warm})
    return rows


def _named(res: Result, precision: str) -> Result:
    res.name = f"{res.name}, {precision}"
    return res


def bench_cpu(concurrency: list[int], tokens: int, out: Path | None, worker_threads: int = 0,
              repeat: int = 3, client: str = "lean") -> list[dict]:
    """CPU time of every process of the stack, per request and per streamed event: where the cores go.

    Per request: 200 one-token generations, one at a time. Per event: `c` streaming clients of `tokens`
    tokens each, on `client` (http_lm). Medians of `repeat` runs (after a warm-up that lets the JVM compile
    its hot paths).
    """
    def cpu_s(procs: dict) -> dict[str, float]:
        out = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        # of the worker's: TorchServe's thread (it reads each call, runs the handler's side of it, sends the frames),
        # whose thread id is the process id; the rest is the engine's thread
        calls = next(t for t in procs["worker"].threads() if t.id == procs["worker"].pid)
        out["worker_calls"] = calls.user_time + calls.system_time
        return out

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), models_dir=_bench_models_dir(Path(tmp), ["lm-shakespeare"], naive=False),
                            extra_env=_env(worker_threads))
        try:
            roles = stack.processes()
            procs = {"gateway": roles["gateway"][0], "torchserve_java": roles["frontend"][0],
                     "worker": roles["worker"][0], "client": psutil.Process()}
            warm = warm_until_compiled(
                lambda: run_client(http_lm(stack.url, "lm-shakespeare", "warm-up", max(concurrency), tokens,
                                           client=client)),
                procs["torchserve_java"].pid, min_bursts=WARMUP_ROUNDS)

            async def one_at_a_time(n: int) -> None:
                async with aiohttp.ClientSession() as session:
                    for _ in range(n):
                        async with session.post(f"{stack.url}/v1/generate", json={
                                "model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 1}) as r:
                            await r.read()

            per_request = []
            for _ in range(repeat):
                before = cpu_s(procs)
                run_client(one_at_a_time(200))
                after = cpu_s(procs)
                per_request.append({k: 1000 * (after[k] - before[k]) / 200 for k in after})
            row = {"load": "one request at a time", "unit": "ms CPU per request"}
            row.update({k: round(_median([r[k] for r in per_request]), 2) for k in per_request[0]})
            rows.append(row)
            for c in concurrency:
                runs = []
                for _ in range(repeat):
                    before = cpu_s(procs)
                    res = run_client(http_lm(stack.url, "lm-shakespeare", "full stack", c, tokens, client=client))
                    after = cpu_s(procs)
                    events = res.events
                    runs.append({k: 1e6 * (after[k] - before[k]) / events for k in after} |
                                {"events": events, "tokens_per_s": res.tokens_per_s})
                row = {"load": f"{c} streams x {tokens} tokens", "unit": "us CPU per event"}
                row.update({k: round(_median([r[k] for r in runs]), 1) for k in runs[0]})
                rows.append(row)
        finally:
            stop_stack(stack)
    print_table(rows, list(rows[0]) + [k for k in rows[-1] if k not in rows[0]])
    _write(out, {"cpu": rows, "tokens": tokens, "repeat": repeat, "client": client, "warm_up": warm})
    return rows


def bench_engine(batches: list[int], tokens: int, out: Path | None, repeat: int = 3) -> list[dict]:
    """Decode tokens/s of the engine alone, per batch size: the modules' step on oneDNN (mkldnn) and on
    torch's native kernels, and the folded step (models/decode.py) on native kernels, in fp32 and int8."""
    loaded = load_lm(MODELS_DIR / "lm-shakespeare")
    print(f"the int8 step multiplies through {int8_gemm_path('cpu')}", flush=True)
    variants = {"onednn_modules": (0, False, False), "native_modules": (None, False, False),
                "native_folded": (None, True, False), "native_folded_int8": (None, True, True)}
    rows = []
    for b in batches:
        row = {"batch": b}
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeat):  # the variants alternate, so a slow moment of the machine hits them alike
            for name, (threshold, folded, int8) in variants.items():
                engine = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=b, mkldnn_min_batch=threshold,
                                  folded_step=folded, int8=int8)
                for i in range(b):
                    engine.add(f"r{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=tokens, seed=i))
                engine.step(1)  # prefill outside the timing
                t0 = time.perf_counter()
                n = 0
                while engine.has_work():
                    n += sum(len(o.text) for o in engine.step(16))
                runs[name].append(n / (time.perf_counter() - t0))
        for name in variants:
            row[name] = round(_median(runs[name]), 1)
        row["native_vs_onednn"] = round(row["native_modules"] / row["onednn_modules"], 2)
        row["folded_vs_modules"] = round(row["native_folded"] / row["native_modules"], 2)
        row["int8_vs_folded"] = round(row["native_folded_int8"] / row["native_folded"], 2)
        rows.append(row)
        print(row, flush=True)
    sampling = bench_sampling(batches, loaded.tokenizer.vocab_size)
    _write(out, {"engine": rows, "sampling": sampling, "tokens": tokens, "threads": torch.get_num_threads(),
                 "repeat": repeat, "int8_gemm": int8_gemm_path("cpu")})
    return rows


def _per_row_generators(generators: list[torch.Generator]) -> torch.Tensor:
    """The baseline draw: every row from its own torch.Generator, one tiny kernel per row (and a host sync
    per row on a GPU)."""
    return torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])


def bench_sampling(batches: list[int], vocab: int, steps: int = 2000) -> list[dict]:
    """Microseconds per sampling step (temperature 0.8, no top-k/top-p): per-row generators vs the
    counter-based draw of the whole batch (engine/sampling.py)."""
    from rnnserve.engine.sampling import sample_with, uniforms

    def variants(b: int) -> dict[str, Callable[[], torch.Tensor]]:
        logits = torch.randn(b, vocab)
        temperature, top_k, top_p = torch.full((b,), 0.8), torch.zeros(b, dtype=torch.long), torch.ones(b)
        generators = [torch.Generator().manual_seed(i) for i in range(b)]
        seeds, positions = torch.arange(b), torch.zeros(b, dtype=torch.long)
        return {"per_row_generators": lambda: sample_with(logits, temperature, top_k, top_p,
                                                          lambda: _per_row_generators(generators)),
                "counter_based": lambda: sample_with(logits, temperature, top_k, top_p,
                                                     lambda: uniforms(seeds, positions))}

    rows = []
    for b in batches:
        row = {"batch": b}
        for name, fn in variants(b).items():
            runs = []
            for _ in range(3):
                fn()
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                runs.append((time.perf_counter() - t0) / steps * 1e6)
            row[f"{name}_us"] = round(_median(runs), 1)
        row["speedup"] = round(row["per_row_generators_us"] / row["counter_based_us"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def _write(out: Path | None, data: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))


def main(args) -> int:
    levels = [int(x) for x in args.concurrency.split(",")]
    out = Path(args.out) if args.out else None
    if args.task == "engine":
        if args.worker_threads:
            torch.set_num_threads(args.worker_threads)
        bench_engine(levels, args.tokens, out, args.repeat)
    elif args.task == "cpu":
        bench_cpu(levels, args.tokens, out, args.worker_threads, args.repeat, args.client)
    elif args.task == "lm":
        bench_lm(levels, args.tokens, out, args.worker_threads, args.step_ms, args.repeat, args.int8,
                 args.fresh_connections, args.client, args.naive, args.gpu, args.max_warm_up_bursts)
    else:
        bench_translation(levels, [int(b) for b in args.beams.split(",")], args.per_client, out, args.worker_threads,
                          args.repeat, args.int8)
    return 0
