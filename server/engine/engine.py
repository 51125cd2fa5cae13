"""The engine: one thread that owns the model and runs the serving loop.

Loop, once per iteration: schedule (admit / cancel / plan) → one batched
forward → sample → detokenize and stream each sequence's new text → retire
finished sequences. Between serving steps it gives a background worker (the
trainer) a step: always when idle, and at least once every
`settings.train_interleave_steps` serving steps when busy, so serving comes
first but training never starves.

Failure model: an exception inside a step fails only the requests of that
step (each gets an error event) and the loop goes on; if the thread itself
dies, `alive` turns False (/ready reports it) and every waiting request gets
an error instead of hanging.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from typing import Any

import torch

from server.engine.attention import StepInterrupted
from server.engine.background import BackgroundTurns, BackgroundWorker
from server.engine.detokenizer import Detokenizer
from server.engine.fairness import FairShare, TenantShares
from server.engine.interrupts import StepInterrupts
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.preemption import Preemption
from server.engine.prefix_cache import PrefixCache
from server.engine.decoding import StepSampler
from server.engine.grammar import GrammarMasks
from server.engine.request import ErrorEvent, FinishEvent, FinishReason, Request, TokenEvent, TokenLogprob
from server.engine.row_prefix import RowPrefix
from server.engine.runner import Runner, RunnerOptions
from server.engine.scheduler import AdapterPlacement, Removals, Scheduler, StepPlan
from server.engine.sequence import Sequence
from server.engine.waiting import WaitingQueue
from server.errors import ApiError, Unavailable
from server.metrics import Metrics, NullMetrics
from server.model.load import BaseModel
from server.settings import Settings

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class EngineStepError(ApiError):
    status = 500
    type = "internal_error"


class Engine:
    def __init__(self, base: BaseModel, settings: Settings, metrics: Metrics | None = None,
                 placement: AdapterPlacement | None = None, loop: EngineLoop | None = None,
                 waiting: WaitingQueue | None = None, background: BackgroundWorker | None = None,
                 runner_options: RunnerOptions | None = None, shares: TenantShares | None = None) -> None:
        """`placement`: where adapter requests run (the adapter manager); None = base model only.
        `loop`, `waiting`: the wake-up and step hooks and the waiting queue, when something built
        before the engine needs them. `background`: the worker given steps between serving steps
        (the trainer). `runner_options`: how steps run on the device; None = from settings (tests
        force the static layout). `shares`: tenants' weights and running caps (None: equal, uncapped)."""
        self.base = base
        self.settings = settings
        self.metrics = metrics or NullMetrics()
        self.loop = loop or EngineLoop()
        self.cache = KVCache.for_model(base.model.config, settings.max_batch, base.max_context,
                                       base.device, base.dtype)
        self.prefix_cache = PrefixCache(self.cache, settings.prefix_cache_tokens)
        if self.prefix_cache.enabled:
            log.info("prefix cache: %d blocks of %d tokens, %.1f MiB of KV reserved",
                     self.prefix_cache.num_blocks, self.prefix_cache.block_tokens,
                     self.prefix_cache.reserved_bytes() / 2**20)
        self.rows = RowPrefix(self.prefix_cache)
        self.runner = Runner(base, self.cache, runner_options or RunnerOptions(
            cuda_graphs=settings.cuda_graphs, sdpa_backends=settings.sdpa_backends))
        self.waiting = waiting if waiting is not None else WaitingQueue(settings.max_queue)
        share = FairShare(shares, settings.fair_scheduling, self.metrics)
        preemption = None
        if settings.fair_scheduling and settings.preemption:
            preemption = Preemption(share.shares, min(settings.max_batch, self.cache.max_batch),
                                    self._suspend, self._resume)
        self.interrupts = StepInterrupts(enabled=preemption is not None)  # for arrivals that will preempt
        self.scheduler = Scheduler(self.cache, settings.max_batch, self.waiting,
                                   settings.max_tokens_per_step, self._new_sequence, placement, share, preemption,
                                   self.prefix_cache if self.prefix_cache.enabled else None)
        self.eos_ids = _eos_ids(base)
        self.vocab = int(base.model.config.vocab_size)
        self.sampler = StepSampler(self.cache.max_batch, self.vocab, base.device, self.eos_ids)
        self.forks = 0  # prefills shared by n > 1 sequences (KV rows copied instead of recomputed)
        self.background = BackgroundTurns(background, settings.train_interleave_steps)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.step_errors = 0
        # Token accounting by path: adapter math vs a merged copy, per adapter key.
        self.adapter_tokens = 0
        self.merged_tokens = 0
        self.adapter_tokens_by_key: Counter[Any] = Counter()
        self.merged_tokens_by_key: Counter[Any] = Counter()
        # Prefix cache, per adapter key (None = base): prompt tokens looked up, and reused from the cache.
        self.prefix_lookup_tokens = self.rows.lookup_tokens
        self.prefix_hit_tokens = self.rows.hit_tokens
        self.preemptions: Counter[str] = Counter()  # per tenant: its running sequences preempted
        self.recomputed_tokens = 0  # tokens preempted sequences prefilled again (prefix-cache hits excluded)

    # --- lifecycle (any thread) -----------------------------------------------
    def start(self) -> None:
        self.loop.alive = True
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running get an error event."""
        self._stopping.set()
        self.loop.alive = False
        self.loop.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def wake(self) -> None:
        self.loop.wake()

    # --- requests (any thread) ------------------------------------------------
    def submit(self, request: Request) -> None:
        if not self.alive:
            raise Unavailable("the generation engine is not running")
        self.waiting.push(request)
        if not self.alive and self.waiting.discard(request):  # the loop exited meanwhile
            raise Unavailable("the generation engine is not running")
        if self.scheduler.would_preempt(request):  # its prefill should not wait for the step in flight
            self.interrupts.request()
        self.loop.wake()

    def cancel(self, request: Request) -> None:
        request.cancel()
        self.loop.wake()

    def idle(self) -> bool:
        return not self.scheduler.running and not self.scheduler.preempted and len(self.waiting) == 0

    def stats(self) -> dict[str, Any]:
        return {
            "alive": self.alive,
            "running": len(self.scheduler.running),
            "waiting": len(self.waiting),
            "preempted": len(self.scheduler.preempted),
            "preemptions": sum(self.preemptions.values()),
            "recomputed_tokens": self.recomputed_tokens,
            "free_kv_rows": self.cache.free_rows,
            "max_batch": self.scheduler.max_batch,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "step_errors": self.step_errors,
            "background_steps": self.background.steps,
            "adapter_tokens": self.adapter_tokens,
            "merged_tokens": self.merged_tokens,
            "prefix_cache_blocks": self.prefix_cache.cached_blocks,
            "prefix_lookup_tokens": sum(self.prefix_lookup_tokens.values()),
            "prefix_hit_tokens": sum(self.prefix_hit_tokens.values()),
            "interrupted_steps": self.interrupts.count,
        }

    # --- engine thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.loop.woken.clear()
                self.loop.run_hooks(self.scheduler.lanes_in_use())
                served = self._serve_step()
                trained = self._background_step(busy=served)
                if not served and not trained:
                    self.loop.woken.wait(IDLE_WAIT_S)
        except BaseException as exc:  # noqa: BLE001 - report, then fail everyone below
            self.error = exc
            log.exception("engine thread died")
        finally:
            self._stopping.set()
            self.loop.alive = False
            self._fail_everything(Unavailable("the generation engine stopped"))

    def _serve_step(self) -> bool:
        interrupt = self.interrupts.arm()
        removals = Removals()
        plan = self.scheduler.schedule(removals)
        self._report_removals(removals)
        if plan is None:
            self._update_gauges()
            return False
        started = time.perf_counter()
        try:
            self._execute(plan, None if plan.urgent else interrupt)
        except StepInterrupted:
            self.interrupts.interrupted()
            return True  # nothing of the step was used: the next pass schedules afresh
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            self.step_errors += 1
            log.exception("engine step failed; failing its %d requests", len(plan.decode) + len(plan.prefill))
            self._fail_plan(plan, exc)
            self.metrics.engine_errors.inc()
        self.steps += 1
        self.interrupts.completed()
        self._observe(plan, time.perf_counter() - started)
        return True

    def _execute(self, plan: StepPlan, interrupt: threading.Event | None = None) -> None:
        logits = self.runner.forward(plan, interrupt)  # [sampling rows, vocab]
        self.scheduler.ran(plan)
        self._account(plan)
        sampling, logits = self._fork(plan.sampling(), logits)
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        if sampling:
            tokens, logprobs = self.sampler.sample(logits, sampling)
        prefilled = 0
        for s, n in plan.prefill:
            s.prefilled += n
            if s in plan.refill:  # a resumed sequence recomputing: no new prompt, nothing new to cache
                self.recomputed_tokens += n
                if not s.prefilling:
                    s.resume_ids = None  # decoding goes on from last_token
                continue
            prefilled += n
            if not s.prefilling:  # before any finish frees the row
                self.rows.prefilled(s)
        self.prompt_tokens += prefilled
        self.metrics.prompt_tokens.inc(prefilled)  # before any finish event goes out
        self.metrics.generated_tokens.inc(len(tokens))
        for i, (s, token) in enumerate(zip(sampling, tokens, strict=True)):
            self._on_token(s, int(token), logprobs[i] if logprobs else None)

    def _fork(self, sampling: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """n > 1: a sequence whose prompt just finished prefilling hands a copy of its KV row to its
        siblings, which then sample from the same prompt logits (one prefill for all n)."""
        if not any(s.forks for s in sampling):
            return sampling, logits
        extra: list[Sequence] = []
        source: list[int] = []
        for i, s in enumerate(sampling):
            if not s.forks:
                continue
            self.cache.fork(s.row, [f.row for f in s.forks], s.prompt_len)
            for f in s.forks:
                f.prefilled, f.awaiting_fork = f.prompt_len, False
                extra.append(f)
                source.append(i)
            s.forks = []
            self.forks += 1
        rows = logits.index_select(0, torch.tensor(source, dtype=torch.long, device=logits.device))
        return [*sampling, *extra], torch.cat([logits, rows])  # [sampling + forks, vocab]

    def _account(self, plan: StepPlan) -> None:
        """Tokens that went through adapter math vs through a merged copy (no adapter math), per key."""
        for s, n in [*((s, 1) for s in plan.decode), *plan.prefill]:
            key = s.request.adapter_key
            if key is None:
                continue
            if plan.lane is not None:
                self.merged_tokens += n
                self.merged_tokens_by_key[key] += n
            elif s.slot >= 0:
                self.adapter_tokens += n
                self.adapter_tokens_by_key[key] += n

    def _on_token(self, s: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        s.generated += 1
        s.last_token = token
        s.output.append(token)
        s.unsent.append(token)
        if logprob is not None:
            s.unsent_logprobs.append(logprob)
        self.tokens_generated += 1
        params = s.request.params
        done = s.matcher is not None and GrammarMasks.advance(s, token)
        if done or (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self._finish(s, "stop")
            return
        s.detok.add(token)
        if s.detok.stopped:
            self._finish(s, "stop")
        elif s.generated >= params.max_new_tokens or s.position >= self.cache.max_seq_len:
            self._finish(s, "length")
        else:
            text = s.detok.take()
            if text:
                self._send(s, text)

    def _finish(self, s: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(s)  # first: a client that sees the finish sees the row freed
        text = s.detok.take(final=True)
        if text or s.unsent:
            self._send(s, text)
        s.request.stream.put(FinishEvent(reason, s.prompt_len, s.generated, s.index, s.cached))

    @staticmethod
    def _send(s: Sequence, text: str) -> None:
        s.request.stream.put(TokenEvent(text, tuple(s.unsent), s.index, tuple(s.unsent_logprobs)))
        s.unsent.clear()
        s.unsent_logprobs.clear()

    def _report_removals(self, removals: Removals) -> None:
        for item in removals.cancelled:
            if isinstance(item, Sequence):
                item.request.stream.put(FinishEvent("cancelled", item.prompt_len, item.generated, item.index))
            else:
                for i in range(item.params.n):
                    item.stream.put(FinishEvent("cancelled", len(item.prompt_ids), 0, i))
        for request, exc in removals.failed:
            request.stream.put(ErrorEvent(exc))

    def _fail_plan(self, plan: StepPlan, exc: Exception) -> None:
        error = EngineStepError(f"generation failed inside the engine: {type(exc).__name__}")
        requests = {s.request for s in (*plan.decode, *(s for s, _ in plan.prefill))}
        for s in [s for s in self.scheduler.running if s.request in requests]:  # n > 1: the whole request
            self.scheduler.finish(s)
            s.request.stream.put(ErrorEvent(error))

    def _fail_everything(self, error: Exception) -> None:
        for s in [*self.scheduler.running, *self.scheduler.preempted.values()]:
            self.scheduler.finish(s)
            s.request.stream.put(ErrorEvent(error))
        for request in self.waiting.drain():
            request.stream.put(ErrorEvent(error))

    def _background_step(self, busy: bool) -> bool:
        ran = self.background.take(busy)
        if ran:
            self.metrics.training_steps.inc()
        return ran

    def _new_sequence(self, request: Request, row: int, slot: int, lane: int | None, index: int = 0) -> Sequence:
        """Sequence `index` of the request's n: seed + index seeds its own stream (reproducible, distinct)."""
        params = request.params
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            seed = (params.seed + index) % 2**63 if params.seed is not None else random.getrandbits(63)
            generator.manual_seed(seed)
        detok = Detokenizer(self.base.tokenizer, request.prompt_ids, params.stop)
        matcher = params.grammar.matcher() if params.grammar is not None else None
        seq = Sequence(request=request, row=row, detok=detok, generator=generator, slot=slot, lane=lane,
                       index=index, matcher=matcher)
        if index == 0 and self.rows.enabled:  # the other n - 1 take a copy of this row (_fork)
            self.rows.admit(seq)
        self.sampler.start(seq)
        return seq

    def _suspend(self, seq: Sequence) -> None:
        """A preemption victim's row is about to be freed (server/engine/preemption.py)."""
        self.preemptions[seq.request.tenant] += 1
        self.metrics.observe_preemption(seq.request.tenant)
        self.rows.suspend(seq)

    def _resume(self, seq: Sequence) -> None:
        """A preempted sequence got a new row: its cached prefix copied in, the row's penalty state rebuilt."""
        self.rows.resume(seq)
        self.sampler.resume(seq)

    def _observe(self, plan: StepPlan, seconds: float) -> None:
        m = self.metrics
        m.step_latency.observe(seconds)
        m.batch_size.observe(len(plan.decode) + len(plan.prefill))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.scheduler.running))


def _eos_ids(base: BaseModel) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(base.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), base.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)
