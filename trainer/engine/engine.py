"""The decoding engine: one backbone, many adapters, many requests, one batch.

    engine = Engine(model, max_batch_size=16)
    generation = engine.submit(Request(prompt_ids, Sampling(max_new_tokens=64), tokenizer, stop_ids))
    for delta in generation: ...          # or `async for`, or generation.result()

A thread of its own runs the model (or, for `generate`, the caller's thread). Each turn of its loop:

1. **admits** waiting requests, oldest first, while the batch has room for their `n` choices
   (continuous batching: a request joins the running batch at the next step);
2. **prefills** them: their prompts, left-padded to one width, in forwards of at most
   `max_prefill_tokens` positions; a prefix shared with a running row (or with another admitted
   request) is copied rather than computed, each prompt is computed once and its KV copied to
   its other choices' slots (`cache.SlotCache`), and each choice samples its first token;
3. **decodes** one token for every row in a single forward of the backbone: each row at its own
   position in its own KV slot, with its own adapter (`lora.AdapterPlan`: rows of different
   adapters and base rows share the forward) and its own sampling (`sampling.choose_tokens`);
4. **retires** finished rows at once (a stop token, a stop string, `max_new_tokens`, or a
   cancelled request), freeing their slots for the next admission. The rows of one adapter stay
   next to each other in the batch, so that its LoRA term is one slice of each projection.

Each request streams `Delta`s as its tokens come; a request whose consumer goes away is
cancelled and frees its rows at the next step. `submit` refuses with `QueueFull` when
`max_queue` requests already wait, so a server can answer 429 instead of queueing forever.
While an engine runs, nothing else may use its model.
"""
import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from trainer.engine import lora, packed
from trainer.engine.cache import SlotCache, decode_mask, extend_mask, extend_positions
from trainer.engine.sampling import RowSampler, Sampling, TokenLogprob, choose_tokens
from trainer.engine.text import TextStream
from trainer.fused import fuse_rms_norms

log = logging.getLogger("ftlab.engine")
_END = object()  # a generation's last event
MAX_PADDING = 1.3  # a prefill forward computes at most this many positions per real token (else it splits)
MIN_SHARED_PREFIX = 8  # prompt tokens two requests must share before one copies the other's KV


class QueueFull(RuntimeError):
    """`max_queue` requests already wait; try again in `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: float = 1.0):
        super().__init__(f"{waiting} requests are already waiting for the model; retry in {retry_after:g} s")
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine was closed (the server is stopping, or its backbone was unloaded)."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter rows can use. `key` names it (a rewritten adapter needs a new key); `path` is its PEFT
    folder, or None for an adapter already loaded in the model under the name `key`."""

    key: str
    path: Optional[Path] = None


@dataclass
class Request:
    """What to generate: a tokenized prompt, how to sample, and how to read the reply back."""

    prompt_ids: list[int]
    sampling: Sampling
    tokenizer: Any  # decodes the reply (text deltas, stop strings)
    stop_token_ids: Sequence[int] = ()  # end a reply (not part of it): EOS, the template's end of turn
    adapter: Optional[Adapter] = None  # None: the backbone alone
    constraint: Any = None  # a `trainer.call_constraint.CallConstraint`: tokens each choice may take next


@dataclass
class Delta:
    """What one choice adds: text (may be empty while held back), its tokens and their log-probs.
    A choice's last delta has `finish_reason` ("stop" | "length") and `n_tokens` (stop token excluded)."""

    index: int
    text: str
    finish_reason: Optional[str] = None
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Choice:
    """One whole reply."""

    index: int
    text: str = ""
    finish_reason: Optional[str] = None
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """A submitted request: its deltas as they come (`for`, `async for`), `cancel()`, or `result()` whole."""

    def __init__(self, request: Request, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.request = request
        self._loop = loop
        self._events = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.live_rows = 0  # its choices in the batch (the engine's count)
        self.finished = False  # its last event was sent

    def cancel(self) -> None:
        """Stop generating: the choices still running end without a last delta, freeing their rows."""
        self.cancelled.set()

    def _emit(self, item) -> None:
        if item is _END or isinstance(item, BaseException):
            self.finished = True
        if self._loop is None:
            self._events.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            self.cancelled.set()

    def __iter__(self):
        while True:
            item = self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self):
        try:
            while True:
                item = await self._events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a consumer that stops early frees the rows

    def result(self) -> list[Choice]:
        """Every choice whole (blocks until the request ends)."""
        choices = [Choice(index) for index in range(self.request.sampling.n)]
        for delta in self:
            _add(choices[delta.index], delta)
        return choices

    async def aresult(self) -> list[Choice]:
        """Every choice whole, awaited (for a generation submitted with an event loop)."""
        choices = [Choice(index) for index in range(self.request.sampling.n)]
        async for delta in self:
            _add(choices[delta.index], delta)
        return choices


def _add(choice: Choice, delta: Delta) -> None:
    choice.text += delta.text
    choice.token_ids += delta.token_ids
    choice.logprobs += delta.logprobs
    if delta.finish_reason is not None:
        choice.finish_reason, choice.n_tokens = delta.finish_reason, delta.n_tokens


@dataclass
class _Row:
    """One choice in the batch; it lives in KV slot `index in Engine._rows`."""

    generation: Generation
    choice: int
    adapter: Optional[str]  # PEFT adapter name
    sampler: RowSampler
    text: TextStream
    length: int  # tokens in its KV slot
    next_token: int = -1  # fed at the next step
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Extension:
    """A generation about to enter the batch: its prompt from `start` on is computed; the tokens before come
    from a running row's slot (`source`) or from a generation computed just before (`leader`)."""

    generation: Generation
    adapter: Optional[str]
    start: int = 0
    source: Optional[int] = None
    leader: Optional[Generation] = None

    @property
    def new_tokens(self) -> int:
        return len(self.generation.request.prompt_ids) - self.start


def _shared(prompt: list[int], other: list[int]) -> int:
    """How many leading tokens two prompts share, leaving `prompt` at least one token to compute."""
    shared = 0
    for a, b in zip(prompt, other):
        if a != b:
            break
        shared += 1
    return min(shared, len(prompt) - 1)


class Engine:
    """Continuous batching over one model (see the module)."""

    def __init__(self, model, *, max_batch_size: int = 16, max_queue: int = 256, max_adapters: int = 4,
                 max_prefill_tokens: int = 2048):
        self.model = model  # the transformers model, or a PeftModel around it once an adapter is loaded
        self.network = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.max_batch_size, self.max_queue = int(max_batch_size), int(max_queue)
        self.max_adapters, self.max_prefill_tokens = max(1, int(max_adapters)), int(max_prefill_tokens)
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(self.network.config, "max_position_embeddings", 0) or 0)
        self.cache = SlotCache(self.max_batch_size)
        self.plan = lora.AdapterPlan()
        self.adapters: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # key → PEFT name, LRU first
        for name in getattr(model, "peft_config", {}) or {}:  # adapters the caller loaded: usable by their names
            lora.check_supported(model, name)
            self.adapters[name] = name
        lora.install(self.network, self.plan)
        fuse_rms_norms(self.network)  # one call per norm instead of eight: a decoding step is many small ops
        self.packed_projections = packed.pack_projections(self.network) if packed.packable(model) else 0
        self._names = (f"adapter{i}" for i in itertools.count())
        self._cache_argument, self._keeps_logits = _forward_arguments(self.network)
        self._waiting: collections.deque[Generation] = collections.deque()
        self._rows: list[_Row] = []
        self._forgotten: set[str] = set()
        self._pinned: set[str] = set()  # adapters of the requests being admitted
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None  # the engine's own thread, once `submit` started it
        self._driver: Optional[threading.Thread] = None  # the thread running `generate`, while it does
        self._closed = False
        self.stats = {"steps": 0, "rows_stepped": 0, "prefills": 0, "prompt_tokens": 0, "shared_prompt_tokens": 0,
                      "generated_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}

    # ---- what callers use --------------------------------------------------------------------
    def submit(self, request: Request, loop: Optional[asyncio.AbstractEventLoop] = None,
               block: bool = False) -> Generation:
        """Queue a request for the engine's own thread (started at the first call); its deltas arrive on the
        returned `Generation` (on `loop`'s thread for `async for`).

        With `max_queue` requests already waiting: `QueueFull`, or with `block` wait for room.
        """
        generation = self._generation(request, loop)
        with self._cond:
            if self._driver is not None:
                raise RuntimeError("generate() is running this engine in another thread")
            while not self._closed and len(self._waiting) >= self.max_queue:
                if not block:
                    raise QueueFull(len(self._waiting))
                self._cond.wait()
            if self._closed:
                raise EngineClosed("the decoding engine is closed")
            self._waiting.append(generation)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ftlab-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return generation

    def generate(self, requests: list[Request], progress: Optional[Callable[[int], None]] = None
                 ) -> list[list[Choice]]:
        """Every request's choices, whole, all batched together; `progress(n)` after each step, n requests done.

        Unless the engine's own thread is serving, the calling thread runs the model. A process that
        also computes with the model in this thread (a validation pass, training) must generate here:
        torch's CPU thread pool is per thread, and a second thread's pool competing for the same cores
        made every decoding step ~45% slower, for good, after one forward pass elsewhere.
        """
        with self._cond:
            background = self._thread is not None
        if background:
            generations = [self.submit(request, block=True) for request in requests]
            results = []
            for generation in generations:
                results.append(generation.result())
                if progress is not None:
                    progress(len(results))
            return results
        generations = [self._generation(request) for request in requests]
        with self._cond:
            if self._driver is not None or self._closed:
                raise RuntimeError("the engine is closed, or generate() is running it in another thread")
            self._driver = threading.current_thread()
            self._waiting.extend(generations)
        try:
            while not all(generation.finished for generation in generations):
                with self._cond:
                    admitted = self._admit()
                self._step(admitted)
                if progress is not None:
                    progress(sum(generation.finished for generation in generations))
        finally:
            with self._cond:
                self._driver = None
            self._tidy()
        return [generation.result() for generation in generations]

    def _generation(self, request: Request, loop=None) -> Generation:
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if request.sampling.n > self.max_batch_size:
            raise ValueError(f"n={request.sampling.n} is more choices than the batch holds "
                             f"(max_batch_size={self.max_batch_size})")
        return Generation(request, loop)

    def forget(self, key: str) -> None:
        """Unload an adapter (a model taken out of service) once no row uses it."""
        with self._cond:
            self._forgotten.add(key)
            self._cond.notify_all()
            if self._thread is None and self._driver is None:  # nothing runs the model: unload it now
                self._drop_forgotten()

    @property
    def busy(self) -> bool:
        """Whether requests are running or waiting."""
        with self._cond:
            return bool(self._rows or self._waiting)

    def close(self) -> None:
        """Stop the engine: waiting and running requests end with `EngineClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._rows:
                    self._tidy()
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admit()
            self._step(admitted)
        error = EngineClosed("the decoding engine was closed")
        for generation in {row.generation for row in self._rows} | set(self._waiting):
            generation._emit(error)
        self._rows.clear()
        self.cache.clear()

    def _tidy(self) -> None:
        """While idle: hold no cache memory, unload forgotten adapters and those beyond `max_adapters`."""
        try:
            self.cache.clear()
            self._drop_forgotten()
            self._evict()  # adapters loaded beyond max_adapters while they were all in use
        except Exception:  # noqa: BLE001 - the loop must go on
            log.exception("unloading adapters failed")

    def _admit(self) -> list[Generation]:
        """Waiting requests that fit in the batch, oldest first (cancelled ones are dropped)."""
        room = self.max_batch_size - len(self._rows)
        admitted = []
        while self._waiting:
            generation = self._waiting[0]
            if generation.cancelled.is_set():
                self._waiting.popleft()._emit(_END)
                continue
            if generation.request.sampling.n > room:
                break
            admitted.append(self._waiting.popleft())
            room -= generation.request.sampling.n
        if admitted:
            self._cond.notify_all()  # room in the queue for blocked submitters
        return admitted

    def _step(self, admitted: list[Generation]) -> None:
        try:
            self._drop_forgotten()
            self._pinned.clear()
            names = {id(g): self._adapter(g.request.adapter) for g in admitted}  # loaded outside inference mode
            with torch.inference_mode():
                started = time.perf_counter()
                if admitted:
                    self._prefill(admitted, names)
                    self._retire()  # choices that ended at their first token
                prefilled = time.perf_counter()
                if self._rows:
                    self._decode()
                    self._retire()
                self.stats["prefill_seconds"] += prefilled - started
                self.stats["decode_seconds"] += time.perf_counter() - prefilled
        except Exception as error:  # noqa: BLE001 - fail this step's requests, keep serving the next ones
            log.exception("decoding failed")
            for generation in {row.generation for row in self._rows} | set(admitted):
                generation._emit(error)
            self._rows.clear()
            self.cache.clear()
        finally:
            self.plan.groups = None

    # ---- prefill -------------------------------------------------------------------------------
    def _prefill(self, admitted: list[Generation], names: dict[int, Optional[str]]) -> None:
        """Compute the admitted prompts into their slots; each choice samples its first token.

        A prompt that shares at least `MIN_SHARED_PREFIX` tokens with a running row of the same adapter (a
        system prompt, a conversation's earlier turns) copies that prefix's KV and computes only the rest.
        Among the admitted ones, the first of a group that shares a prefix is computed first (wave 1), and
        the others then copy its prefix (wave 2).
        """
        first_new_row = len(self._rows)
        running = {}  # id(generation) → (its first slot, generation, adapter) of the rows in the batch
        for slot, row in enumerate(self._rows):
            running.setdefault(id(row.generation), (slot, row.generation, row.adapter))
        first_wave, second_wave, leaders = [], [], []
        for generation in sorted(admitted, key=lambda g: (names[id(g)] or "", len(g.request.prompt_ids))):
            name, prompt = names[id(generation)], generation.request.prompt_ids
            live = [(_shared(prompt, other.request.prompt_ids), slot) for slot, other, adapter in running.values()
                    if adapter == name]
            shared, slot = max(live, default=(0, None))
            if shared >= MIN_SHARED_PREFIX:
                first_wave.append(_Extension(generation, name, start=shared, source=slot))
                continue
            leader = max(((_shared(prompt, g.request.prompt_ids), g) for g in leaders if names[id(g)] == name),
                         default=(0, None), key=lambda pair: pair[0])
            if leader[0] >= MIN_SHARED_PREFIX:
                second_wave.append(_Extension(generation, name, start=leader[0], leader=leader[1]))
            else:
                first_wave.append(_Extension(generation, name))
                leaders.append(generation)
        slots: dict[int, int] = {}
        for wave in (first_wave, second_wave):
            batch: list[_Extension] = []
            # one forward per max_prefill_tokens of padded new tokens; similar lengths together pad least
            for extension in sorted(wave, key=lambda e: (e.adapter or "", e.new_tokens)):
                padded = extension.new_tokens * (len(batch) + 1)  # the widest so far: the wave is sorted
                real = extension.new_tokens + sum(e.new_tokens for e in batch)
                if batch and (padded > self.max_prefill_tokens or padded > MAX_PADDING * real):
                    self._extend(batch, slots)
                    batch = []
                batch.append(extension)
            if batch:
                self._extend(batch, slots)
        self._group_new_rows(first_new_row)
        self._pinned.clear()  # their rows hold the adapters now

    def _extend(self, extensions: list["_Extension"], slots: dict[int, int]) -> None:
        """One forward over new rows' tokens; their first tokens sampled. `slots`: id(generation) → its slot."""
        first_slot = len(self._rows)
        row_slots = list(itertools.accumulate([first_slot] + [e.generation.request.sampling.n
                                                               for e in extensions[:-1]]))
        for extension, slot in zip(extensions, row_slots):
            slots[id(extension.generation)] = slot
            source = extension.source if extension.leader is None else slots[id(extension.leader)]
            if source is not None:
                self.cache.copy_slot(source, slot, extension.start)
        starts = [e.start for e in extensions]
        lengths = [e.new_tokens for e in extensions]
        width = max(lengths)
        input_ids = torch.zeros((len(extensions), width), dtype=torch.long)
        for row, extension in enumerate(extensions):
            input_ids[row, width - lengths[row]:] = torch.tensor(extension.generation.request.prompt_ids[starts[row]:])
        span = self.cache.prepare_extend(row_slots, starts, lengths)
        positions = extend_positions(starts, lengths, width, self.device)
        self.plan.groups = self._groups([e.adapter for e in extensions], width)
        logits = self._forward(input_ids.to(self.device), positions.clamp_min(0), extend_mask(positions, span))
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += sum(lengths)
        self.stats["shared_prompt_tokens"] += sum(starts)
        for row, (extension, slot) in enumerate(zip(extensions, row_slots)):
            request, generation = extension.generation.request, extension.generation
            length = len(request.prompt_ids)
            rows = [_Row(generation, choice, extension.adapter,
                         RowSampler(request.sampling, choice, self.device, request.constraint),
                         TextStream(request.tokenizer, request.sampling.stop), length)
                    for choice in range(request.sampling.n)]
            for choice in range(1, len(rows)):
                self.cache.copy_slot(slot, slot + choice, length)
            self._rows += rows
            generation.live_rows = len(rows)
            tokens, logprobs = choose_tokens(logits[row].expand(len(rows), -1), [r.sampler for r in rows],
                                             [r.generated for r in rows])
            for each, token, logprob in zip(rows, tokens, logprobs):
                self._advance(each, token, logprob)

    # ---- decode --------------------------------------------------------------------------------
    def _decode(self) -> None:
        """One token for every row, in one forward."""
        rows = self._rows
        positions = torch.tensor([row.length for row in rows], device=self.device)
        span = self.cache.prepare_decode(positions)
        self.plan.groups = self._groups([row.adapter for row in rows], 1)
        input_ids = torch.tensor([[row.next_token] for row in rows], device=self.device)
        logits = self._forward(input_ids, positions[:, None], decode_mask(positions, span))
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(rows)
        tokens, logprobs = choose_tokens(logits, [row.sampler for row in rows], [row.generated for row in rows])
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.length += 1  # its input token is in the cache now
            self._advance(row, token, logprob)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits of every row's last position."""
        extra = {}
        if self._keeps_logits:
            # An index tensor, not `1`: the LM head then reads a contiguous copy of the last positions. Given
            # the strided view `hidden[:, -1:]` of a prefill, torch's matmul expands the frozen head's weight
            # once per row instead (1.5 s for 23 prompts on the embedded SmolLM2, against 30 ms).
            extra["logits_to_keep"] = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        output = self.network(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                              **{self._cache_argument: self.cache}, **extra)
        return output.logits[:, -1]

    def _groups(self, adapters: list[Optional[str]], tokens_per_row: int) -> list:
        """The adapter plan of a forward whose batch rows use `adapters` (None: no adapter)."""
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(adapters):
            if name is not None:
                rows.setdefault(name, []).append(index)
        return [(name, lora.rows_of(indices, tokens_per_row, self.device)) for name, indices in rows.items()]

    # ---- a row's tokens ------------------------------------------------------------------------
    def _advance(self, row: _Row, token: int, logprob: Optional[TokenLogprob]) -> None:
        """Take the row's new token: stream its text, or end the row."""
        request = row.generation.request
        if row.generation.cancelled.is_set():
            row.done = True
            return
        if token in request.stop_token_ids:
            return self._finish(row, row.text.flush(), "stop")
        row.generated.append(token)
        row.next_token = token
        self.stats["generated_tokens"] += 1
        text = row.text.push(token)
        new = dict(token_ids=[token], logprobs=[logprob] if logprob is not None else [])
        if row.text.stopped:
            return self._finish(row, text, "stop", **new)
        at_limit = self.max_positions and row.length >= self.max_positions  # no position left to feed it at
        if len(row.generated) >= request.sampling.max_new_tokens or at_limit:
            return self._finish(row, text + row.text.flush(), "length", **new)
        row.generation._emit(Delta(row.choice, text, **new))

    def _finish(self, row: _Row, text: str, reason: str, **new) -> None:
        row.done = True
        row.generation._emit(Delta(row.choice, text, reason, len(row.generated), **new))

    def _retire(self) -> None:
        """Free the slots of finished rows (and of cancelled requests); end requests whose choices all ended."""
        rows = self._rows
        for index in range(len(rows) - 1, -1, -1):
            if rows[index].generation.cancelled.is_set():
                rows[index].done = True
            if not rows[index].done:
                continue
            rows[index].generation.live_rows -= 1
            if rows[index].generation.live_rows == 0:
                rows[index].generation._emit(_END)
            self._remove(index)

    # ---- rows grouped by adapter -----------------------------------------------------------------
    # The rows of one adapter stay next to each other in the batch, so that each adapter's LoRA term is
    # one slice of a projection's output (`lora.rows_of`). A row joins its group, or leaves it, by
    # trading KV slots with one row of each group in between: at most one small copy per group.
    def _group_new_rows(self, first: int) -> None:
        """Move each row from index `first` on, which joined at the end, next to the rows of its adapter."""
        rows = self._rows
        for position in range(first, len(rows)):
            adapter = rows[position].adapter
            if all(row.adapter != adapter for row in rows[:position]):
                continue  # a new group: it stays at the end
            while rows[position - 1].adapter != adapter:
                start = position - 1  # the group just before this row starts at `start`
                while rows[start - 1].adapter == rows[position - 1].adapter:
                    start -= 1
                self._swap(start, position)
                position = start

    def _remove(self, index: int) -> None:
        """Take row `index` out of the batch: the last row of its group fills its place, then each later group's
        last row fills the place just before that group."""
        rows = self._rows
        hole, group = index, rows[index].adapter
        while hole < len(rows) - 1:
            end = hole + 1
            while end < len(rows) and rows[end].adapter == group:
                end += 1
            if end - 1 != hole:
                self.cache.copy_slot(end - 1, hole, rows[end - 1].length)
                rows[hole] = rows[end - 1]
            hole = end - 1
            if hole < len(rows) - 1:
                group = rows[hole + 1].adapter
        rows.pop()

    def _swap(self, a: int, b: int) -> None:
        """Rows `a` and `b` trade places, KV slots included."""
        rows, spare = self._rows, self.cache.spare
        self.cache.copy_slot(a, spare, rows[a].length)
        self.cache.copy_slot(b, a, rows[b].length)
        self.cache.copy_slot(spare, b, rows[a].length)
        rows[a], rows[b] = rows[b], rows[a]

    # ---- adapters ------------------------------------------------------------------------------
    def _adapter(self, adapter: Optional[Adapter]) -> Optional[str]:
        """The PEFT name of a request's adapter, loading it the first time (least recently used ones go, never
        one that a row, or a request admitted with this one, uses)."""
        if adapter is None:
            return None
        name = self.adapters.get(adapter.key)
        if name is not None:
            self.adapters.move_to_end(adapter.key)
            self._pinned.add(name)
            return name
        if adapter.path is None:
            raise KeyError(f"adapter {adapter.key!r} is not loaded and has no path")
        name = next(self._names)
        log.info("loading adapter %s", adapter.path)
        if not hasattr(self.model, "peft_config"):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.network, str(adapter.path), adapter_name=name)
        else:
            self.model.load_adapter(str(adapter.path), adapter_name=name)
        self.model.eval()
        try:
            lora.check_supported(self.model, name)
        except lora.UnsupportedAdapter:
            self._unload(name)
            raise
        lora.install(self.network, self.plan)
        self.adapters[adapter.key] = name
        self._pinned.add(name)
        self._evict()
        return name

    def _in_use(self) -> set[str]:
        return {row.adapter for row in self._rows if row.adapter is not None} | self._pinned

    def _evict(self) -> None:
        in_use = self._in_use()
        for key, name in list(self.adapters.items()):
            if len(self.adapters) <= self.max_adapters:
                break
            if name not in in_use:
                log.info("unloading adapter %s", key)
                del self.adapters[key]
                self._unload(name)

    def _drop_forgotten(self) -> None:
        in_use = self._in_use()
        with self._cond:
            forgotten = list(self._forgotten)
        for key in forgotten:
            name = self.adapters.get(key)
            if name is not None and name in in_use:
                continue  # once its rows are done
            if name is not None:
                del self.adapters[key]
                self._unload(name)
            with self._cond:
                self._forgotten.discard(key)

    def _unload(self, name: str) -> None:
        if len(getattr(self.model, "peft_config", {})) > 1:  # PEFT keeps at least one adapter; it stays unused
            with warnings.catch_warnings():  # PEFT warns that it made another adapter active: none is, here
                warnings.simplefilter("ignore")
                self.model.delete_adapter(name)


def _forward_arguments(model: torch.nn.Module) -> tuple[str, bool]:
    """The forward's KV-cache argument (`cache` in transformers 5.x, `past_key_values` before), and whether
    it takes `logits_to_keep` (no full-vocabulary logits for every prompt position)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters
