"""The CLI's command handlers: parse nothing, print results, return an exit status.

Each takes the argparse namespace, calls the SDK, and prints either a human
view (tables, plain text) or JSON (`--json`). Errors propagate as SDK
exceptions; `cli.main` turns them into a message on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.cli_output import (
    ADAPTER_COLUMNS,
    JOB_COLUMNS,
    ProgressBar,
    adapter_pairs,
    adapter_row,
    format_pairs,
    format_table,
    job_pairs,
    job_row,
    print_json,
)
from client.errors import InvalidInputError
from client.models import Adapter, TrainingJob
from client.sync_client import Client

EXIT_JOB_FAILED = 12


def make_client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key, timeout=args.timeout)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """JSON for scripts (`--json`), text for people."""
    if args.json:
        print_json(data)
    else:
        print(text, flush=True)


# --- generate -----------------------------------------------------------------------------------

def generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: dict[str, Any] = dict(adapter_id=args.adapter_id, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   seed=args.seed, stop=args.stop, **decoding_options(args))
    with make_client(args) as client:
        if not args.stream:
            result = client.generate(prompt, **options)
            human = result.text if len(result.choices) < 2 else "\n".join(
                f"[{c.index}] {c.text}" for c in result.choices)
            emit(args, result.to_dict(), human)
            return 0
        with client.generate_stream(prompt, **options) as stream:
            for delta in stream:
                if args.json:
                    print_json({"text": delta})
                else:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            emit(args, stream.result().to_dict(), "")  # human: end the streamed line
    return 0


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags given, as API fields (flags left out are left to the server's defaults)."""
    out: dict[str, Any] = {}
    for name in ("n", "logprobs", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_tokens",
                 "stop_token_ids", "ignore_eos", "regex", "choice"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    if args.logit_bias:
        out["logit_bias"] = dict(_bias(item) for item in args.logit_bias)
    if args.json_schema:
        source = Path(args.json_schema[1:]).read_text() if args.json_schema.startswith("@") else args.json_schema
        try:
            out["json_schema"] = json.loads(source)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"--json-schema is not JSON: {exc}") from None
    return out


def _bias(item: str) -> tuple[str, float]:
    token, sep, bias = item.partition("=")
    try:
        if not sep:
            raise ValueError
        return str(int(token)), float(bias)
    except ValueError:
        raise InvalidInputError(f"--logit-bias wants TOKEN_ID=BIAS, got {item!r}") from None


# --- adapters -----------------------------------------------------------------------------------

def _show_adapter(args: argparse.Namespace, adapter: Adapter) -> None:
    emit(args, adapter.raw, format_pairs(adapter_pairs(adapter)))


def adapters_upload(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        _show_adapter(args, client.upload_adapter(args.adapter_id, args.path))
    return 0


def print_listing(args: argparse.Namespace, items: list[Any], columns: Any,
                  row: Callable[[Any], Any], empty: str) -> int:
    """A list command's output: raw JSON records with --json, else a table (or `empty`)."""
    if args.json:
        print_json([item.raw for item in items])
    elif items:
        print(format_table(columns, [row(item) for item in items]))
    else:
        print(empty)
    return 0


def adapters_list(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        adapters = client.list_adapters(tenant=args.tenant)
    return print_listing(args, adapters, ADAPTER_COLUMNS, adapter_row, "no adapters")


def adapters_show(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        _show_adapter(args, client.get_adapter(args.adapter_id))
    return 0


def adapters_delete(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        client.delete_adapter(args.adapter_id)
    emit(args, {"id": args.adapter_id, "deleted": True}, f"deleted {args.adapter_id}")
    return 0


def adapters_merge(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        _show_adapter(args, client.merge_adapter(args.adapter_id))
    return 0


def adapters_unmerge(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        _show_adapter(args, client.unmerge_adapter(args.adapter_id))
    return 0


# --- training -----------------------------------------------------------------------------------

def _modules(values: list[str] | None) -> list[str] | None:
    """`--target-modules q_proj v_proj` and `--target-modules q_proj,v_proj` mean the same."""
    if not values:
        return None
    return [m for v in values for m in v.split(",") if m]


def train(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.submit_training(
            args.adapter_id, args.data, method=args.method, rank=args.rank, alpha=args.alpha,
            target_modules=_modules(args.target_modules), steps=args.steps, learning_rate=args.learning_rate,
            batch_size=args.batch_size, seed=args.seed, idempotency_key=args.idempotency_key)
        if not args.wait:
            emit(args, job.raw, f"job {job.id} {job.status} (adapter {job.adapter_id or args.adapter_id}); "
                                f"follow it with: loraplex jobs show {job.id}")
            return 0
        return _follow(args, client, job)


def _follow(args: argparse.Namespace, client: Client, job: TrainingJob) -> int:
    bar = ProgressBar()
    print(f"job {job.id} submitted for adapter {job.adapter_id or args.adapter_id}", file=sys.stderr)
    try:
        job = client.wait(job.id, on_progress=bar.update, poll_interval=args.poll_interval)
    except KeyboardInterrupt:
        bar.finish()
        print(f"stopped following; job {job.id} keeps running (cancel: loraplex jobs cancel {job.id})",
              file=sys.stderr)
        raise
    bar.finish()
    if args.json:
        print_json(job.raw)
    if job.status != "succeeded":
        reason = f": {job.error}" if job.error else ""
        print(f"error: job {job.id} {job.status}{reason}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if not args.json:
        print(job.adapter_id or args.adapter_id)
    return 0


# --- jobs ---------------------------------------------------------------------------------------

def jobs_list(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        jobs = client.list_jobs(tenant=args.tenant)
    return print_listing(args, jobs, JOB_COLUMNS, job_row, "no training jobs")


def jobs_show(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.get_job(args.job_id)
    emit(args, job.raw, format_pairs(job_pairs(job)))
    return 0


def jobs_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.cancel_job(args.job_id)
    emit(args, job.raw, f"job {job.id} {job.status}")
    return 0
