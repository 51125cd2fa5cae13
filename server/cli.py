"""`loraplex` command line: `serve` runs the server; other subcommands belong to the client.

Flags override their env twins (`LORAPLEX_<FLAG>`): a flag left out is not
passed to Settings at all, so the environment (then the default) decides.

SIGTERM/SIGINT: stop admitting (new requests 503 + Retry-After, /ready false),
let in-flight requests finish within `drain_timeout_s`, run the shutdown hooks
through the app's lifespan, exit 0. A second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from types import FrameType

# Before torch loads: idle OpenMP workers sleep instead of spinning, so the
# engine thread, the HTTP loop and the loaders do not fight over CPU cores
# (bench/NOTES.md, "Start-up"). Override by setting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from server.api.keys import ApiKeys, ApiKeysError, load_keys
from server.settings import Settings

CLIENT_COMMANDS = ("generate", "adapters", "train", "jobs", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA/MiSS adapter server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the base model and adapters over HTTP",
                           argument_default=argparse.SUPPRESS)
    serve.add_argument("--model", help="local HF model dir or hub id (default: embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--store", help="adapter and job store directory (default ./adapters_store)")
    serve.add_argument("--s3-store", dest="s3_store", metavar="s3://BUCKET[/PREFIX]",
                       help="keep adapters in this S3-compatible bucket, shared by every server pointed at it")
    serve.add_argument("--s3-endpoint-url", dest="s3_endpoint_url", help="S3-compatible endpoint (default AWS)")
    serve.add_argument("--s3-region", dest="s3_region", help="bucket region (default: the AWS config chain's)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--quantize", choices=["none", "int8", "int4", "nf4", "fp4"],
                       help="weight-only quantization of the base's Linear layers (default none; int4: CUDA)")
    serve.add_argument("--max-batch", type=int, dest="max_batch", help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, dest="max_queue", help="waiting requests before 429")
    serve.add_argument("--max-adapters-resident", dest="max_adapters_resident", metavar="N|auto",
                       help="device slots per adapted module (default auto: max-batch, capped on GPU)")
    serve.add_argument("--api-keys", dest="api_keys", help="JSON file {key: {tenant, admin}}")
    serve.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_true",
                       help="allow a non-loopback host without --api-keys")
    serve.add_argument("--drain-timeout", type=float, dest="drain_timeout_s", help="seconds to finish in-flight work")
    serve.add_argument("--replicas", type=int, help="engine replicas (default 1: this process; more: a Ray "
                       "Serve application, needs the `cluster` extra)")
    serve.add_argument("--ray-address", dest="ray_address", help="Ray cluster to join (default RAY_ADDRESS, "
                       "else a local one is started)")
    serve.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", dest="log_format", choices=["json", "text"])
    for name in CLIENT_COMMANDS:
        sub.add_parser(name, help=f"client command (see `loraplex {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CLIENT_COMMANDS:
        return _delegate_to_client(argv)
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings(**overrides)
        keys = load_keys(settings.api_keys)  # the one read of the keys file: a bad one stops start-up here
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            print(f"loraplex serve: {where}: {err.get('msg')}", file=sys.stderr)
        return 2
    except ApiKeysError as exc:
        print(f"loraplex serve: api_keys: {exc}", file=sys.stderr)
        return 2
    return serve(settings, keys)


def _delegate_to_client(argv: list[str]) -> int:
    try:
        from client.cli import main as client_main
    except ImportError as exc:
        print(f"loraplex {argv[0]}: the client commands are not installed ({exc})", file=sys.stderr)
        return 2
    return int(client_main(argv) or 0)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the engine before closing, and exits 0 on SIGTERM.

    uvicorn's own handler would stop accepting connections at once and then
    re-raise the signal after shutdown (exit status -15); we flip the app to
    'not accepting' (503), wait for in-flight generation, then let uvicorn shut
    down normally.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        logging.getLogger("loraplex").info("signal %s: draining in-flight requests", signal.Signals(sig).name)
        threading.Thread(target=self._drain_then_exit, name="loraplex-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        from server.app import drain  # the one drain loop (the lifespan's shutdown runs it too)

        services = self.config.app.state.services  # type: ignore[union-attr]
        if services is not None:
            asyncio.run(drain(services, services.settings.drain_timeout_s))  # this thread has no loop of its own
        self.should_exit = True


def serve(settings: Settings, keys: ApiKeys | None = None) -> int:
    from server.adapters.store.store_lock import StoreInUse, acquire_store_lock

    if settings.s3_store is not None and not _bucket_answers(settings):  # before the model (or Ray) loads
        return 1
    if settings.clustered:
        return _serve_cluster(settings, keys)
    try:  # before the model loads: a second server on this store is refused at once, in one line
        release_store = acquire_store_lock(settings.store)
    except StoreInUse as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 1
    try:
        return _serve_locked(settings, keys)
    finally:
        release_store()


def _bucket_answers(settings: Settings) -> bool:
    """Before the model loads: a bucket that does not answer is refused in one line, not a traceback."""
    try:
        from server.adapters.store.object_store import ObjectStore
    except ImportError as exc:
        print(f"loraplex serve: --s3-store needs the s3 extra (pip install 'loraplex[s3]'): {exc}", file=sys.stderr)
        return False
    from server.app import s3_options
    from server.errors import StoreUnavailable

    try:
        ObjectStore(s3_options(settings)).check()
    except StoreUnavailable as exc:
        print(f"loraplex serve: {exc.message}", file=sys.stderr)
        return False
    return True


def _serve_cluster(settings: Settings, keys: ApiKeys | None) -> int:
    """`--replicas N` > 1 or `--ray-address`: the same app as Ray Serve replicas (server/cluster/)."""
    from server.adapters.store.store_lock import StoreInUse
    from server.logging import configure_logging

    try:
        from server.cluster.run import serve_cluster
    except ImportError as exc:
        print(f"loraplex serve: --replicas/--ray-address need Ray Serve: pip install 'loraplex[cluster]' ({exc})",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return serve_cluster(settings, keys)
    except StoreInUse as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 1


def _serve_locked(settings: Settings, keys: ApiKeys | None) -> int:
    from server.app import create_server_app, uvicorn_limits
    from server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("loraplex").info(
        "serving model=%s device=%s dtype=%s quantize=%s host=%s port=%d max_batch=%d max_queue=%d store=%s "
        "auth=%s cpu_threads=%d", settings.model or "<embedded>", settings.device, settings.dtype, settings.quantize,
        settings.host, settings.port, settings.max_batch, settings.max_queue, settings.s3_store or settings.store,
        "api-keys" if settings.api_keys else "off", settings.torch_threads)
    app = create_server_app(settings, keys)
    # log_config=None: uvicorn's loggers propagate to our (JSON) root handler; our RequestIdMiddleware
    # writes the access lines (with request id and tenant), so uvicorn's own are off.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            lifespan="on", log_config=None, access_log=False, **uvicorn_limits(settings))
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
