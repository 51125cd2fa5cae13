"""`loraplex generate|adapters|train|jobs`: the client half of the `loraplex` command.

`server/cli.py` owns `loraplex serve` and hands every other subcommand here
(`main(argv)` with argv starting at the subcommand). Global options (`--url`,
`--api-key`, `--json`) are accepted before or after the subcommand.

Exit status: 0 success, 2 usage, 3 cannot connect, 4 auth, 5 not found,
6 invalid input, 7 conflict, 8 too large, 9 rate limited, 10 unavailable,
11 server error, 12 training job ended failed/cancelled, 14 wait timed out,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from client import cli_commands as commands
from client.config import API_KEY_ENV, URL_ENV, resolve_url
from client.errors import ApiError, ConnectionFailedError, LoraplexError

EXIT_INTERRUPTED = 130


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Added to the top parser (defaults) and to each subparser (SUPPRESS: keep the top value)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--url", default=default, help=f"server URL (env {URL_ENV}; default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=default, help=f"API key (env {API_KEY_ENV})")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="machine-readable JSON on stdout")
    parser.add_argument("--timeout", type=float, default=default, help="HTTP timeout in seconds (default 300)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="loraplex client: generate, manage adapters, "
                                     "train. (`loraplex serve` starts the server.)")
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub, common)
    _add_adapters(sub, common)
    _add_train(sub, common)
    _add_jobs(sub, common)
    return parser


def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="generate text (optionally with an adapter)")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    p.add_argument("--adapter", dest="adapter_id", metavar="ID", help="adapter id (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (deterministic)")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="STR", help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    _add_decoding(p)
    p.set_defaults(handler=commands.generate)


def _add_decoding(p: argparse.ArgumentParser) -> None:
    """Decoding options of `generate` (docs/API.md, Generation); each maps to the API field of its name."""
    p.add_argument("-n", "--n", type=int, metavar="N", help="sequences to sample from the prompt")
    p.add_argument("--logprobs", type=int, metavar="K", help="report each token's logprob and the top K")
    p.add_argument("--frequency-penalty", type=float, metavar="F")
    p.add_argument("--presence-penalty", type=float, metavar="P")
    p.add_argument("--repetition-penalty", type=float, metavar="R")
    p.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=BIAS", help="repeatable")
    p.add_argument("--min-tokens", type=int, metavar="N")
    p.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int, metavar="ID",
                   help="repeatable")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="JSON|@FILE", help="the output is JSON valid against it")
    constraint.add_argument("--regex", metavar="RE", help="the output matches this regular expression")
    constraint.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these "
                            "(repeatable)")


def _add_adapters(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", parents=[common], help="upload, list, show, delete, merge, unmerge adapters")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("upload", parents=[common], help="upload a PEFT adapter directory")
    up.add_argument("adapter_id", metavar="ID")
    up.add_argument("path", metavar="DIR", help="holds adapter_config.json and adapter_model.safetensors")
    up.set_defaults(handler=commands.adapters_upload)
    ls = actions.add_parser("list", parents=[common], help="list your adapters")
    ls.add_argument("--tenant", help="(admins) list another tenant's adapters")
    ls.set_defaults(handler=commands.adapters_list)
    for name, handler, text in (("show", commands.adapters_show, "show one adapter"),
                                ("delete", commands.adapters_delete, "delete an adapter"),
                                ("merge", commands.adapters_merge, "serve an adapter from a merged copy"),
                                ("unmerge", commands.adapters_unmerge, "back to unmerged serving")):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("adapter_id", metavar="ID")
        a.set_defaults(handler=handler)


def _add_train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="submit a training job (and --wait for it)")
    p.add_argument("--adapter-id", required=True, metavar="ID", help="id the trained adapter is registered as")
    p.add_argument("--method", choices=("lora", "dora", "miss"), default="lora")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='one {"prompt": ..., "completion": ...} object per line')
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--target-modules", nargs="+", metavar="NAME", help="e.g. q_proj v_proj (or q_proj,v_proj)")
    p.add_argument("--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the same job")
    p.add_argument("--wait", action="store_true", help="follow progress on stderr until the job ends")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="S")
    p.set_defaults(handler=commands.train)


def _add_jobs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("jobs", parents=[common], help="list, show, cancel training jobs")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", parents=[common], help="list your training jobs")
    ls.add_argument("--tenant", help="(admins) list another tenant's jobs")
    ls.set_defaults(handler=commands.jobs_list)
    for name, handler, text in (("show", commands.jobs_show, "show one job"),
                                ("cancel", commands.jobs_cancel, "cancel a queued or running job")):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("job_id", metavar="ID")
        a.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client command; returns the process exit status (never raises for API errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.handler(args) or 0)
    except ApiError as exc:
        print(f"error: {exc.message} (HTTP {exc.status}, {exc.type})", file=sys.stderr)
        return exc.exit_code
    except ConnectionFailedError as exc:
        print(f"error: {exc.message} (is the server running at {make_client_url(args)}?)", file=sys.stderr)
        return exc.exit_code
    except LoraplexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `loraplex ... | head`
        return 0


def make_client_url(args: argparse.Namespace) -> str:
    return resolve_url(getattr(args, "url", None))


def _bench(argv: list[str]) -> int:
    """`loraplex bench ...` is routed here by server/cli.py; the benchmark lives in `bench/`."""
    try:
        from bench.cli import main as bench_main
    except ImportError as exc:
        print(f"loraplex bench: the benchmark package is not installed ({exc})", file=sys.stderr)
        return 2
    return int(bench_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
