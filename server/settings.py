"""The one typed configuration object, validated once at start-up.

Every field has an env twin `LORAPLEX_<FIELD>` (pydantic-settings); CLI flags
are passed as init kwargs and win over the environment.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
ENV_PREFIX = "LORAPLEX_"
# LORAPLEX_* variables that other loraplex programs read (the client SDK and CLI; docker compose's
# host port): they may share the server's environment and are not settings.
OTHER_PROGRAMS_ENV = frozenset({"LORAPLEX_URL", "LORAPLEX_API_KEY", "LORAPLEX_HOST_PORT"})


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraplex"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")

    # --- process -----------------------------------------------------------
    model: str | None = Field(None, description="Local HF model dir or hub id; None = embedded SmolLM2-135M-Instruct")
    store: Path = Field(Path("adapters_store"), description="Adapters and job records live here (with "
                        "s3_store: only job records and this server's cache of downloaded adapters)")
    s3_store: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                                 description="s3://bucket[/prefix]: adapters live in this S3-compatible bucket, "
                                 "shared by every server pointed at it; credentials from the standard AWS chain "
                                 "(AWS_ACCESS_KEY_ID..., ~/.aws, instance role)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2...); None = AWS")
    s3_region: str | None = Field(None, description="Bucket region; None = the AWS chain's (AWS_REGION...)")
    s3_cache_bytes: int = Field(4 * 1024 * MiB, ge=MiB, description="Local disk cache of downloaded adapter "
                                "versions (under store/.s3cache), least recently used evicted past this")
    s3_timeout_s: float = Field(5.0, gt=0, description="Connect and read timeout of one call to the bucket")
    s3_max_attempts: int = Field(2, ge=1, le=10, description="Attempts per call to the bucket before its request "
                                 "fails with 503 store_unavailable")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "int8", "int4", "nf4", "fp4"] = Field(
        "none", description="Weight-only quantization of the base's Linear layers, adapters on top in "
        "the compute dtype: int8 = one int8 per weight, a scale per output row (torchao; CPU and CUDA); int4 = "
        "tinygemm int4 in groups (torchao; CUDA, bfloat16 only); nf4 = QLoRA's 4-bit NormalFloat, an absmax "
        "per 64 weights (bitsandbytes; CPU and CUDA); fp4 = the same with a 4-bit float code book. lm_head stays "
        "unquantized")
    api_keys: Path | None = Field(None, description="JSON file {key: {tenant, admin}}, or {keys: that, tenants: "
                                  "{tenant: limits}}; None = single-tenant dev mode")
    insecure_no_auth: bool = False
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Converted default-model cache")
    log_level: str = "info"
    log_prompts: bool = False
    log_format: Literal["json", "text"] = Field("json", description="`serve` log lines: one JSON object each, or text")
    metrics_max_adapter_series: int = Field(256, ge=1, description="Distinct (tenant, adapter) metric label pairs")

    # --- cluster -----------------------------------------------------------
    replicas: int = Field(1, ge=1, le=256, description="Engine replicas; 1 = this one process, more = a Ray "
                          "Serve application (the `cluster` extra) with adapter-affinity routing behind the "
                          "same host/port, sharing the store directory")
    ray_address: str | None = Field(None, description="Ray cluster to join when replicas > 1 (else RAY_ADDRESS, "
                                    "else a local Ray instance is started)")
    shared_gc_grace_s: float = Field(60.0, ge=0, description="Replicas sharing a store: a superseded or deleted "
                                     "version's files outlive its replacement by at least this, so another "
                                     "replica that resolved it just before can still load it")

    # --- engine ------------------------------------------------------------
    max_batch: int = Field(32, ge=1, le=4096, description="Sequences decoded together")
    max_queue: int = Field(256, ge=1, description="Waiting requests before 429")
    fair_scheduling: bool = Field(True, description="Admit waiting requests by tenant, in proportion to their "
                                  "weights (virtual token counter); false = arrival order")
    preemption: bool = Field(True, description="With fair_scheduling: a tenant below its share of the batch may "
                             "preempt the youngest sequence of the tenant furthest above it (recomputed later)")
    max_tokens_per_step: int = Field(512, ge=16, description="Token budget of one step (prefill chunks + decode)")
    max_seq_len: int = Field(2048, ge=16, description="KV-cache length per sequence (clipped to the model context)")
    prefix_cache_tokens: int = Field(8192, ge=0, description="Prompt tokens of KV kept for reuse by later "
                                     "prompts with the same prefix and adapter (32-token blocks, LRU); 0 = off")
    max_new_tokens_limit: int = Field(4096, ge=1)
    max_stop_strings: int = Field(16, ge=0)
    max_stop_chars: int = Field(256, ge=1)
    max_logit_bias: int = Field(300, ge=0, description="logit_bias entries per request")
    max_top_logprobs: int = Field(20, ge=0, description="Alternatives per token with logprobs")
    grammar_cache_size: int = Field(64, ge=1, description="Compiled grammars kept (LRU by schema hash)")
    grammar_compile_timeout_s: float = Field(10.0, gt=0, description="A schema/regex slower to compile is a 4xx")
    max_grammar_chars: int = Field(65536, ge=16, description="Size of a JSON schema / regex / choice list")
    drain_timeout_s: float = Field(30.0, ge=0)
    train_interleave_steps: int = Field(4, ge=1, description="When busy, a training step at least every N serving steps")
    cuda_graphs: bool = Field(False, description="CUDA: replay base-only decode steps from captured CUDA graphs "
                              "(one per decode batch bucket and 256-key length bucket, captured on first use). "
                              "Off by default until measured on a GPU; set on a CPU, start-up fails")
    cuda_sdpa: Literal["flash_efficient", "efficient", "flash", "cudnn", "math", "torch"] = Field(
        "flash_efficient", description="CUDA: the SDPA backends attention may use; flash_efficient = flash "
        "where it applies (unmasked prefill), memory-efficient otherwise (masked decode), math for what "
        "neither takes, never cuDNN (whose plan can be rebuilt as lengths change); a single name allows that "
        "backend alone; torch = torch's own choice. A non-default value on a CPU fails start-up")

    # --- adapters ----------------------------------------------------------
    max_adapters_resident: int | Literal["auto"] = Field(
        "auto", description="Device slots per adapted module: a positive integer, or auto = max_batch (a full "
        "batch of distinct adapters runs at once), capped on a GPU by slot_memory_fraction. Slots are "
        "allocated as adapters arrive, so unused ones cost nothing")
    slot_memory_fraction: float = Field(0.5, gt=0, le=1, description="GPU, max_adapters_resident auto: the "
                                        "slots (at max_rank) may take at most this fraction of the device "
                                        "memory free after the base model and KV cache")
    max_adapters_host: int = Field(128, ge=1, description="Host-memory LRU capacity (adapters)")
    prefetch_adapters: bool = Field(True, description="Warm the host tier at start-up (newest first, never "
                                    "past max_adapters_host) and with each upload, so a first request "
                                    "skips the disk read")
    max_rank: int = Field(64, ge=1, le=1024)
    cpu_kernels: bool = Field(True, description="CPU, float32: decode's mixed-adapter add runs in a small C "
                              "kernel built at first use with the machine's compiler (cached in "
                              "cache_dir/kernels); off, or without a compiler, the torch path runs")
    cpu_column_major: bool = Field(True, description="CPU, float32: keep every Linear weight `[out, in]` "
                                   "column-major (its transpose contiguous), the layout the CPU GEMM reads "
                                   "fastest at decode sizes (bench/NOTES.md)")
    slot_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the adapters' factors in device slots; auto = the model's dtype. "
        "float16 on a float32 CPU model halves the bytes a decode step reads per adapter, at ~5e-4 "
        "relative rounding of the adapter weights (bench/NOTES.md)")
    max_adapter_bytes: int = Field(256 * MiB, ge=1)
    max_merged: int = Field(2, ge=0, description="Merged (dedicated) copies allowed at once")
    module_copy_budget_mb: int = Field(256, ge=0, description="Device memory (MiB) for the pool of whole-module "
                                       "copies adapters bring in modules_to_save (a fine-tuned lm_head or "
                                       "embed_tokens: vocab x hidden each); it holds budget / one copy's bytes "
                                       "copies (at most 2 per device slot), allocated at the first such adapter. "
                                       "An adapter needing more copies than that is refused; 0 refuses them all")
    max_pattern_keys: int = Field(1024, ge=1, description="Regexes in one adapter config (rank_pattern and "
                                  "alpha_pattern keys, layers_pattern entries); each is matched against "
                                  "every targeted module")
    max_config_list_items: int = Field(4096, ge=1, description="Entries of target_modules, exclude_modules, "
                                       "layers_to_transform or layers_pattern in one adapter config")

    # --- HTTP limits -------------------------------------------------------
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="JSON bodies (uploads use max_adapter_bytes)")
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    header_timeout_s: float = Field(15.0, gt=0, description="A request's head (request line + headers) must "
                                    "arrive within this of the connection opening or the previous response (408)")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next piece of a request "
                                       "body (408)")
    body_read_timeout_s: float = Field(600.0, gt=0, description="A whole request body must arrive within this "
                                       "(408); 256 MiB at 0.5 MB/s fits")
    cpu_threads: int = Field(0, ge=0, le=4096, description="torch intra-op threads of the server process; "
                             "0 = OMP_NUM_THREADS if set, else every usable core but one (the event loop, "
                             "tokenizer and clients keep a core instead of waiting behind spinning math threads)")
    tokenize_workers: int = Field(2, ge=1, le=64, description="Prompts tokenized at once (others wait their "
                                  "turn); each prompt is also cut at the context + 1 tokens")
    max_json_depth: int = Field(32, ge=4, le=200, description="Nesting depth of client JSON parsed outside "
                                "the request body: adapter configs, safetensors headers, training JSONL lines")

    # --- training ----------------------------------------------------------
    max_train_examples: int = Field(10_000, ge=1)
    max_train_tokens_per_example: int = Field(1024, ge=8)
    max_train_steps: int = Field(100_000, ge=1)
    train_max_attempts: int = Field(3, ge=1)
    train_checkpoint_every: int = Field(10, ge=1, description="Optimizer steps between job checkpoints")
    max_train_upload_bytes: int = Field(64 * MiB, ge=1024, description="JSONL upload to /v1/training/jobs/upload")
    train_lease_s: float = Field(30.0, gt=0, description="With --s3-store: a claimed job's lease in the bucket, "
                                 "renewed every third of this; a server silent this long loses its job to another")
    train_clock_skew_s: float = Field(2.0, ge=0, description="With --s3-store: the most two servers' clocks may "
                                      "differ; a lease counts as expired only this long after its expiry time")

    @field_validator("max_adapters_resident", mode="before")
    @classmethod
    def _slots(cls, value: object) -> int | str:
        """One clear message for a bad value (pydantic's union error would list both branches)."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
            return number
        raise ValueError(f"must be a positive integer or 'auto', not {value!r}")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        check_environment(os.environ)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if self.torch_device.type != "cuda":
            if self.cuda_graphs:
                raise ValueError("cuda_graphs needs a CUDA device; this server runs on the CPU")
            if self.cuda_sdpa != "flash_efficient":
                raise ValueError(f"cuda_sdpa={self.cuda_sdpa!r} applies to CUDA only; this server runs on the CPU")
        if self.quantize == "int4" and self.torch_device.type != "cuda":
            raise ValueError("quantize=int4 runs on CUDA only (torchao 0.18 has no int4 weight-only layout for "
                             "this CPU build of torch); use quantize=int8 or nf4 on the CPU")
        if self.quantize == "int4" and self.torch_dtype != torch.bfloat16:
            raise ValueError("quantize=int4 needs dtype bfloat16 (torchao's tinygemm int4 kernel)")
        if self.train_clock_skew_s * 3 >= self.train_lease_s:
            raise ValueError("train_clock_skew_s must be under a third of train_lease_s (a lease renewed every "
                             "third of its time must stay valid on the owner's clock)")
        if self.api_keys is None and not self.insecure_no_auth and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind non-loopback host {self.host!r} without --api-keys "
                "(pass --insecure-no-auth to override)"
            )
        return self

    @property
    def clustered(self) -> bool:
        """Served by Ray Serve replicas sharing the store (server/cluster/), not by this one process."""
        return self.replicas > 1 or self.ray_address is not None

    @property
    def sdpa_backends(self) -> tuple[str, ...] | None:
        """The SDPA backends a CUDA step may use; None = torch's choice (and on CPU)."""
        if self.torch_device.type != "cuda" or self.cuda_sdpa == "torch":
            return None
        return ("flash", "efficient", "math") if self.cuda_sdpa == "flash_efficient" else (self.cuda_sdpa,)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    @property
    def slot_torch_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.slot_dtype == "auto" else _DTYPES[self.slot_dtype]

    @property
    def torch_threads(self) -> int:
        """cpu_threads, else OMP_NUM_THREADS when the environment sets it, else every usable core but one."""
        if self.cpu_threads:
            return self.cpu_threads
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) >= 1:
            return int(omp)
        return max(1, len(os.sched_getaffinity(0)) - 1)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_environment(environ: Mapping[str, str]) -> None:
    """A misspelled `LORAPLEX_*` variable would otherwise be ignored and its default served silently."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_PROGRAMS_ENV
    for key in sorted(environ):
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            close = difflib.get_close_matches(key.upper(), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown setting in the environment: {key}{hint}; "
                             f"the LORAPLEX_* variables are listed in the README")
