"""The `rnnserve` command: train, archive, serve."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a training config dataclass, typed from its default."""
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default, text = f.default, f.metadata["help"]  # every field has one (training.loop.opt)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            # the default shown unless the help already says it, or there is none (an empty string)
            shown = "" if default == "" or "default" in text else " (default: %(default)s)"
            parser.add_argument(flag, type=type(default), default=default, help=text + shown)


def _cmd_train(args: argparse.Namespace) -> int:
    from rnnserve.training.corpus import DataError

    try:
        return _train(args)
    except DataError as e:  # bad data stops the run before training, naming the file and line
        print(f"rnnserve train: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    if args.task == "lm":
        from rnnserve.training.lm import LMTrainConfig, train_lm

        cfg = LMTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LMTrainConfig)
                               if f.name != "extra"})
        metrics = train_lm(cfg)
    else:
        from rnnserve.training.translation import TranslationTrainConfig, train_translation

        cfg = TranslationTrainConfig(**{f.name: getattr(args, f.name)
                                        for f in dataclasses.fields(TranslationTrainConfig) if f.name != "extra"})
        metrics = train_translation(cfg)
    metrics.pop("history", None)
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from rnnserve.offline import main_translate

    return main_translate(args)


def _cmd_attention(args: argparse.Namespace) -> int:
    from rnnserve.attention_plot import main as attention

    return attention(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from rnnserve.offline import main_generate

    return main_generate(args)


def _cmd_import(args: argparse.Namespace) -> int:
    from rnnserve.importer import main as import_model

    return import_model(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rnnserve.training.evaluate import main as evaluate

    return evaluate(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.task == "sessions":
        from rnnserve.bench.sessions import main as bench_sessions

        return bench_sessions(args)
    if args.task == "serving":
        from rnnserve.bench.serving import main as bench_serving

        args.concurrency = args.concurrency or "64,256,1024"
        return bench_serving(args)
    from rnnserve.bench.baselines import main as bench

    args.concurrency = args.concurrency or {"translation": "1,32", "cpu": "32"}.get(args.task, "1,8,32,64")
    return bench(args)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from rnnserve.bench.loadtest import main as loadtest

    return loadtest(args)


def _cmd_soak(args: argparse.Namespace) -> int:
    from rnnserve.bench.soak import main as soak

    return soak(args)


def _cmd_archive(args: argparse.Namespace) -> int:
    import os

    from rnnserve.service.archive import build_archives

    models_dir = args.models_dir or os.environ.get("RNNSERVE_MODELS_DIR")
    profile = "gpu" if args.gpu else None  # None: RNNSERVE_ARCHIVE_PROFILE, else cpu
    for path in build_archives(models_dir, args.model_store or os.environ.get("RNNSERVE_MODEL_STORE"), profile):
        print(path)
    return 0


SERVE_OPTIONS = ("host", "port", "ts_host", "ts_inference_port", "ts_management_port", "ts_metrics_port",
                 "ts_grpc_inference_port", "ts_grpc_management_port", "ts_worker_port")


def _cmd_serve(args: argparse.Namespace) -> int:
    from rnnserve.service import launcher

    overrides = {k: v for k, v in vars(args).items() if k in SERVE_OPTIONS and v is not None}
    code = getattr(launcher, args.command)(**overrides)
    # everything is stopped: skip the interpreter's teardown (collecting torch's and the app's objects took
    # seconds after TorchServe had stopped, while Ctrl-C looked unanswered)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write its folder")
    tsub = p.add_subparsers(dest="task", required=True)
    from rnnserve.training.lm import LMTrainConfig

    _add_dataclass_args(tsub.add_parser("lm", help="language model on any text, over characters or subwords"),
                        LMTrainConfig)
    try:
        from rnnserve.training.translation import TranslationTrainConfig

        _add_dataclass_args(tsub.add_parser("translation", help="attention encoder-decoder on any language pair, "
                                                                "from line-aligned files or a TSV"),
                            TranslationTrainConfig)
    except ImportError:
        pass
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("translate", help="translate lines from a file or standard input, without the server")
    p.add_argument("model", help="a model folder, or the name of one under RNNSERVE_MODELS_DIR (default models/)")
    p.add_argument("--input", "-i", default=None, help="source lines (default: standard input)")
    p.add_argument("--output", "-o", default=None, help="where the translations go (default: standard output)")
    p.add_argument("--beam-size", type=int, default=4, help="beams per sentence, 1 = greedy (default: 4)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT length-penalty alpha (default: 0.6)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences decoded together (default: 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most subword tokens per translation (default: twice the source's, plus 10)")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("attention", help="draw a translation's attention matrix to a PNG, without the server")
    p.add_argument("model", help="a translation model folder, or the name of one under RNNSERVE_MODELS_DIR")
    p.add_argument("text", help="the source text to translate")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--beam-size", type=int, default=4, help="beams, 1 = greedy (default: 4)")
    p.add_argument("--target-prefix", default=None, help="force the translation to start with this text")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("generate", help="print a language model's generation after a prompt, without the server")
    p.add_argument("model", help="a model folder, or the name of one under RNNSERVE_MODELS_DIR (default models/)")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--stop", action="append", default=None, help="a string that ends the text (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("import", help="turn a word_language_model state_dict and its vocabulary into a model folder")
    p.add_argument("--weights", required=True, help="the state_dict file (torch.save(model.state_dict(), F))")
    p.add_argument("--vocab", required=True,
                   help="the vocabulary: one word per line in index order (corpus.dictionary.idx2word), or a JSON list")
    p.add_argument("--out", required=True, help="model folder to write, e.g. models/lm-wikitext")
    p.add_argument("--name", default="", help="model name as served (default: the folder's name)")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], default=None,
                   help="the recurrent cell (default: read from the weights' shapes)")
    p.add_argument("--data-terms", default="", help="the training data's origin and terms, for the model card")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("evaluate", help="loss/perplexity on a text, or BLEU/chrF on line-aligned files")
    p.add_argument("model", help="a model folder, or the name of one under RNNSERVE_MODELS_DIR (default models/)")
    p.add_argument("--text-file", help="language models: text to score")
    p.add_argument("--int8", action="store_true",
                   help="language models: also the loss through the serving decode step in fp32 and in int8, "
                        "and whether int8 keeps quality (at most 0.01 nats/char worse); translation: BLEU through "
                        "the fp32 and the int8 decoder steps, and whether int8 keeps quality (at most 0.3 BLEU lower)")
    p.add_argument("--src-file", help="translation: source sentences, one per line")
    p.add_argument("--ref-file", help="translation: reference translations, line-aligned with --src-file")
    p.add_argument("--beam-size", type=int, default=4, help="translation: beams per sentence (default: 4)")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="translation: GNMT length-penalty alpha (0: none; default: 0.6)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="throughput and latency: raw engine vs naive handler vs full stack")
    p.add_argument("task", choices=["engine", "lm", "translation", "cpu", "serving", "sessions"],
                   help="engine: the LM engine in-process; lm, translation: full stack vs raw engine vs naive "
                        "handler; cpu: CPU time per request of each process; serving: the serving path alone, on a "
                        "synthetic model whose engine costs nothing (tokens/s, latency, errors, CPU per token of "
                        "each process); sessions: continuing a long "
                        "conversation from its state vs re-sending its history")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts")
    p.add_argument("--tokens", type=int, default=256, help="lm: new tokens per request")
    p.add_argument("--beams", default="1,4", help="translation: beam sizes")
    p.add_argument("--per-client", type=int, default=16, help="translation: sentences per client")
    p.add_argument("--repeat", type=int, default=3, help="runs of every level; the tables give medians")
    p.add_argument("--step-ms", type=float, default=None,
                   help="lm: the handler's and raw engine's step budget (default: the archive's target_step_ms)")
    p.add_argument("--worker-threads", type=int, default=0,
                   help="torch threads of the workers and of the raw engine (0 = torch's default)")
    p.add_argument("--int8", action="store_true",
                   help="lm: also the raw engine and the full stack with the int8 decode step, against fp32; "
                        "translation: the raw engine with the fp32 decoder step against the int8 one (no stack)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="lm: each client opens its connection inside the timed burst (default: before the clock "
                        "starts, as a service's clients keep their connections open)")
    p.add_argument("--client", choices=["lean", "aiohttp"], default="lean",
                   help="lm, cpu: the streaming clients' HTTP client: the gateway's lean one (default), which "
                        "takes the least CPU from the cores the stack runs on, or aiohttp's")
    p.add_argument("--no-naive", dest="naive", action="store_false",
                   help="lm: leave the naive handlers out: the raw engine against the full stack only, so that many "
                        "--repeat runs (each an adjacent pair, whose ratio the table's median takes) fit in a sitting")
    p.add_argument("--gpu", action="store_true",
                   help="lm: on a CUDA GPU: the stack's archives take the GPU profile, the raw engine is built as its "
                        "worker builds it (fp16, CUDA graphs), and the admission limits are raised to the largest "
                        "--concurrency")
    p.add_argument("--max-warm-up-bursts", type=int, default=60,
                   help="lm: the warm-up's bound: bursts of the largest level until TorchServe's JVM has compiled "
                        "its hot paths, at most this many (a 1,024-stream burst takes seconds)")
    p.add_argument("--token-ms", type=float, default=1.0,
                   help="serving: the synthetic engine's step time, slept (a fast GPU's; 0: none)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("loadtest", help="locust, headless, against a running stack; reports in results/")
    p.add_argument("--host", default="http://127.0.0.1:8000", help="gateway URL (loopback unless --allow-remote)")
    p.add_argument("--users", type=int, default=8, help="concurrent users (closed loop)")
    p.add_argument("--run-time", default="60s", help="bound by time, e.g. 30s, 5m")
    p.add_argument("--max-requests", type=int, default=0, help="bound by count (0 = no bound)")
    p.add_argument("--arrival-rate", type=float, default=0.0, help="open loop: Poisson arrivals per second")
    p.add_argument("--weights", default=None, help='e.g. "stream=4,generate=1,openai=1,translate=2"')
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each generation request")
    p.add_argument("--out", default=None, help="results folder (default results/loadtest-<time>)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    p.set_defaults(func=_cmd_loadtest)

    p = sub.add_parser("soak", help="minutes of moderate load on a fresh stack: memory and latency over time")
    p.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    p.add_argument("--users", type=int, default=8, help="concurrent locust users")
    p.add_argument("--out", default=None, help="write samples and result as JSON here")
    p.set_defaults(func=_cmd_soak)

    p = sub.add_parser("archive", help="build a .mar for every model folder into the model store")
    p.add_argument("--models-dir", default=None,
                   help="folder of model folders (default: RNNSERVE_MODELS_DIR, else the repository's models/)")
    p.add_argument("--model-store", default=None,
                   help="where the .mar files go (default: RNNSERVE_MODEL_STORE, else model_store/)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU worker profile: 1,024 rows, CUDA graphs, fp16 (service/archive.py GPU_SETTINGS; "
                        "default: RNNSERVE_ARCHIVE_PROFILE=gpu|cpu, else cpu)")
    p.set_defaults(func=_cmd_archive)

    for command, text in (("serve", "start TorchServe and the gateway in the foreground"),
                          ("gateway", "start the gateway only (TorchServe at RNNSERVE_TS_URL)"),
                          ("torchserve", "start TorchServe only, in the foreground")):
        p = sub.add_parser(command, help=text)
        p.add_argument("--host", help="gateway bind address (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="gateway port (default 8000)")
        p.add_argument("--ts-host", help="TorchServe bind address (default 127.0.0.1)")
        for name in ("inference", "management", "metrics", "grpc-inference", "grpc-management", "worker"):
            p.add_argument(f"--ts-{name}-port", type=int, help=f"TorchServe {name} port")
        p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: one line per upstream call in the gateway, per client in benchmarks
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from rnnserve.training.card import invoked_with

    invoked_with(argv)  # model cards record the command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
