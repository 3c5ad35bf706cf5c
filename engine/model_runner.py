"""Turning a scheduled step into one forward pass over the paged cache and sampled tokens."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from engine.host_head import HostHead
from engine.lora.device import DeviceLoRA
from engine.lora.slot_table import SlotLoad
from engine.models import pooling
from engine.models.base import CausalLM
from engine.models.paged import AttentionMetadata, PagedKVStore, PrefillSegment
from engine.outputs import ModelRunnerOutput, TokenLogprob
from engine.request import Request
from engine.sampler import SampledArrays, Sampler
from engine.sampling_metadata import SamplingMetadata, SamplingRow
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput, StepPhase
from engine.stats import Histogram


@dataclass(frozen=True, slots=True)
class ModelInput:
    """A step's tokens flattened into one row, decodes first, and what to sample from.

    The requests in ``sampling`` reach the end of what they know, and so produce tokens: one
    from their last token, and one from each draft they verify. ``logits_indices`` lists the
    flat index of each such position, request by request; ``sampling_rows`` their settings.
    """

    token_ids: mx.array  # [T] int32
    attention: AttentionMetadata
    logits_indices: mx.array  # [R] int32
    sampling: tuple[ScheduledRequest, ...]
    sampling_rows: tuple[SamplingRow | None, ...]  # [R]; None: sampled late
    late_requests: tuple[Request, ...]  # the requests of the None rows, in order
    token_slots: list[int]  # [T] each token's adapter slot (0: the base model)
    pooled: tuple[PooledChunk, ...] = ()  # embedding requests' prompt chunks, pooled not sampled


@dataclass(frozen=True, slots=True)
class PooledChunk:
    """An embedding request's prompt tokens of this step, at ``segment`` of the flat row;
    ``last`` when they end its prompt (the step then yields its embedding)."""

    request: Request
    segment: pooling.Segment
    last: bool


@dataclass(slots=True)
class SampledPart:
    """Some of a step's sampled rows (``rows``: their indices among all R), queued on the
    device."""

    rows: tuple[int, ...]
    arrays: SampledArrays


@dataclass(slots=True)
class InFlightStep:
    """A submitted step: which requests sample (and at how many positions each), and their
    tokens, still on the device.

    Rows whose sampling needs every earlier token on the host (penalties, constraints, logits
    processors) are sampled late: their logits are computed with the step, and ``sample_late``
    samples them once the step before has been read back, while the device runs this one.
    """

    ids: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()  # positions sampled per request of ``ids``
    parts: list[SampledPart] = field(default_factory=list)
    late_rows: tuple[int, ...] = ()
    late_requests: tuple[Request, ...] = ()
    late_logits: mx.array | None = None  # [L, V], sampled by ``sample_late``
    pooled: dict[str, mx.array] = field(default_factory=dict)  # finished embeddings [D]

    @property
    def samples(self) -> bool:
        """Whether the step yields anything: tokens or embeddings."""
        return bool(self.ids or self.pooled)


class ModelRunner:
    """Owns the model and the device KV pools; only the engine thread calls it."""

    def __init__(
        self,
        model: CausalLM,
        store: PagedKVStore,
        lora: DeviceLoRA | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.store = store
        self.lora = lora
        self.sampler = Sampler(seed)
        self.mask_seconds = Histogram()  # time to compute each constrained row's token mask
        self.windows = [layer.window for layer in model.model.layers]
        self.host_head = HostHead.for_model(model)  # one row's logits by sgemv (CPU)
        self._device_tokens: dict[str, tuple[mx.array, int]] = {}

    def execute_model(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its tokens."""
        step = self.submit(output)
        self.sample_late(step)
        return self.collect(step)

    def submit(self, output: SchedulerOutput) -> InFlightStep:
        """Queue one step on the device and return at once: the caller prepares the next step
        while this one computes, and ``collect``s it afterwards (after ``sample_late``)."""
        if not output.scheduled:
            return InFlightStep()
        inputs = self.prepare_inputs(output)
        if self.lora is not None:
            self.lora.set_step(inputs.token_slots)
        caches = self.store.layer_caches(inputs.attention, self.windows)
        hidden = self.model.hidden(inputs.token_ids[None], caches)[0]  # [T, hidden]
        pooled = self._pool(inputs.pooled, hidden)
        if not inputs.sampling:
            mx.async_eval(self.store.state, *pooled.values())
            return InFlightStep(pooled=pooled)
        rows = hidden[inputs.logits_indices]  # [R, hidden]
        if self.host_head is not None and rows.shape[0] == 1:
            logits = self.host_head(rows)
        else:
            logits = self.model.logits(rows)  # [R, vocab]
        step = InFlightStep(
            ids=tuple(item.request.request_id for item in inputs.sampling),
            counts=tuple(item.num_sampled for item in inputs.sampling),
            pooled=pooled,
        )
        early = [i for i, row in enumerate(inputs.sampling_rows) if row is not None]
        late = [i for i, row in enumerate(inputs.sampling_rows) if row is None]
        self._device_tokens = {}
        if early:
            rows = [inputs.sampling_rows[i] for i in early]
            part_logits = logits if len(early) == logits.shape[0] else logits[mx.array(early)]
            meta = SamplingMetadata.from_rows(rows, logits.shape[-1])
            part = SampledPart(tuple(early), self.sampler.submit(part_logits, meta))
            step.parts.append(part)
            self._expose(step, part)
        if late:
            step.late_rows = tuple(late)
            step.late_requests = tuple(inputs.late_requests)
            step.late_logits = logits[mx.array(late)]
            mx.async_eval(step.late_logits)
        mx.async_eval(self.store.state, *pooled.values())
        return step

    def warm_up(self, prefill_tokens: int, decode_rows: tuple[int, ...] = (1, 2)) -> None:
        """Run the model on dummy tokens once: a prefill of ``prefill_tokens`` beside decodes
        of each of ``decode_rows`` rows, and a sampling of its logits greedy, at a
        temperature and with top-p, by a sampler of its own (the engine's key stream is left
        as it was). Kernels built on first use (MLX's CUDA JIT, ``mx.compile``) are built now
        rather than during the first requests. It writes only the null block."""
        bs = self.store.block_size
        for rows in decode_rows:
            num_tokens = rows + prefill_tokens
            null_table = mx.zeros((1, -(-prefill_tokens // bs)), dtype=mx.int32)
            attention = AttentionMetadata(
                positions=mx.array([0] * rows + list(range(prefill_tokens)), dtype=mx.int32),
                slot_mapping=mx.array([i % bs for i in range(num_tokens)], dtype=mx.int32),
                num_decodes=rows,
                decode_block_tables=mx.zeros((rows, 1), dtype=mx.int32),
                decode_seq_lens=mx.ones((rows,), dtype=mx.int32),
                prefills=(PrefillSegment(rows, prefill_tokens, prefill_tokens, null_table),),
                block_size=bs,
            )
            if self.lora is not None:
                self.lora.set_step([0] * num_tokens)
            caches = self.store.layer_caches(attention, self.windows)
            tokens = mx.zeros((1, num_tokens), dtype=mx.int32)
            hidden = self.model.hidden(tokens, caches)[0]
            logits = self.model.logits(hidden[-3:])
            settings = (
                SamplingParams(temperature=0.0),
                SamplingParams(),
                SamplingParams(temperature=0.7, top_p=0.9),
            )
            sample_rows = [SamplingRow(params, (), ()) for params in settings]
            meta = SamplingMetadata.from_rows(sample_rows, logits.shape[-1])
            sampler = Sampler(0)
            sampler.resolve(sampler.submit(logits, meta))
            mx.eval(self.store.state)

    def _pool(self, chunks: tuple[PooledChunk, ...], hidden: mx.array) -> dict[str, mx.array]:
        """Fold each embedding request's chunk into its pooling so far; the embeddings of the
        requests whose prompts end here. hidden: [T, D]."""
        finished: dict[str, mx.array] = {}
        for chunk in chunks:
            request, config = chunk.request, chunk.request.pooling
            part = pooling.reduce(config.mode, hidden, [chunk.segment])[0]  # [D]
            if chunk.segment.position > 0 and request.pooled_so_far is not None:
                part = pooling.combine(config.mode, request.pooled_so_far, part)
            request.pooled_so_far = None if chunk.last else part
            if chunk.last:
                counts = [request.num_prompt_tokens]
                finished[request.request_id] = pooling.finish(config, part[None], counts)[0]
        return finished

    def sample_late(self, step: InFlightStep) -> None:
        """Sample the rows that needed the host to catch up (call once the step before this
        one has been read back); the device is still computing this step meanwhile."""
        if step.late_logits is None:
            return
        vocab = step.late_logits.shape[-1]
        rows = []
        for request in step.late_requests:
            start = time.perf_counter()
            rows.append(SamplingRow.from_request(request, vocab))
            if request.constraint is not None:  # the time is the constraint's mask
                self.mask_seconds.observe(time.perf_counter() - start)
        meta = SamplingMetadata.from_rows(rows, vocab)
        part = SampledPart(step.late_rows, self.sampler.submit(step.late_logits, meta))
        step.late_logits = None
        step.parts.append(part)
        self._expose(step, part)

    def _expose(self, step: InFlightStep, part: SampledPart) -> None:
        """The next step may consume these tokens before anyone reads them: each request's
        last sampled position is its newest token."""
        ends = itertools.accumulate(step.counts)  # plain Python: numpy costs more on a few rows
        last_row = {end - 1: rid for rid, end in zip(step.ids, ends, strict=True)}
        for j, row in enumerate(part.rows):
            if row in last_row:
                self._device_tokens[last_row[row]] = (part.arrays.tokens, j)

    def load_adapter(self, load: SlotLoad) -> None:
        """Write an adapter's weights into its device slot (before the step that uses it)."""
        assert self.lora is not None, "adapter slots were not built (max_loras = 0)"
        self.lora.load(load)

    def collect(self, step: InFlightStep) -> ModelRunnerOutput:
        """The sampled tokens of a submitted step (waits for the device)."""
        if not step.samples:
            return ModelRunnerOutput()
        pooled = {rid: np.array(vector) for rid, vector in step.pooled.items()}
        if not step.ids:
            return ModelRunnerOutput(pooled=pooled)
        self.sample_late(step)
        num_rows = sum(step.counts)
        token_ids: list[int] = [0] * num_rows
        row_logprobs: list = [None] * num_rows
        for part in step.parts:
            result = self.sampler.resolve(part.arrays)
            for j, row in enumerate(part.rows):
                token_ids[row] = result.token_ids[j]
                row_logprobs[row] = result.logprobs[j]
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        row = 0
        for rid, count in zip(step.ids, step.counts, strict=True):
            sampled[rid] = token_ids[row : row + count]
            lps = [lp for lp in row_logprobs[row : row + count] if lp is not None]
            if lps:
                logprobs[rid] = [
                    TokenLogprob(
                        token_id=lp.token_id,
                        logprob=lp.logprob,
                        top=tuple(zip(lp.top_token_ids, lp.top_logprobs, strict=True)),
                    )
                    for lp in lps
                ]
            row += count
        return ModelRunnerOutput(sampled=sampled, logprobs=logprobs, pooled=pooled)

    def prepare_inputs(self, output: SchedulerOutput) -> ModelInput:
        bs = self.store.block_size
        decodes = [s for s in output.scheduled if s.phase == StepPhase.DECODE]
        prefills = [s for s in output.scheduled if s.phase != StepPhase.DECODE]
        tokens: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        segments: list[PrefillSegment] = []
        sampling: list[ScheduledRequest] = []
        sampling_rows: list[SamplingRow | None] = []
        pooled: list[PooledChunk] = []
        late_requests: list[Request] = []
        logits_indices: list[int] = []
        vocab = self.model.config.vocab_size
        token_slots: list[int] = []
        unseen_at: list[int] = []  # flat indices whose token is still on the device
        unseen_src: list[tuple[mx.array, int]] = []
        for item in decodes + prefills:
            start = len(tokens)
            all_ids = item.request.all_token_ids
            drafts = item.draft_token_ids
            num_fed = item.num_tokens - len(drafts)  # tokens before the drafts
            known = all_ids[item.start : item.start + num_fed]
            tokens.extend(known)
            if len(known) < num_fed:  # the last token was sampled by the step in flight
                assert len(known) == num_fed - 1 and not drafts, "at most one token is unseen"
                unseen_at.append(len(tokens))
                unseen_src.append(self._device_tokens[item.request.request_id])
                tokens.append(0)
            tokens.extend(drafts)
            token_slots.extend([item.request.lora_slot] * item.num_tokens)
            pos = np.arange(item.start, item.start + item.num_tokens)
            table = np.asarray(item.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if item.phase != StepPhase.DECODE:
                n_blocks = -(-(item.start + item.num_tokens) // bs)
                segments.append(
                    PrefillSegment(
                        start=start,
                        length=item.num_tokens,
                        seq_len=item.start + item.num_tokens,
                        block_table=mx.array(table[None, :n_blocks], dtype=mx.int32),
                    )
                )
            if item.request.pooling is not None:
                segment = pooling.Segment(start, item.num_tokens, item.start)
                pooled.append(PooledChunk(item.request, segment, item.samples))
            elif item.samples:
                sampling.append(item)
                first = len(tokens) - 1 - len(drafts)
                logits_indices.extend(range(first, len(tokens)))
                if item.request.needs_host_tokens and not drafts:
                    sampling_rows.append(None)
                    late_requests.append(item.request)
                else:
                    sampling_rows.extend(SamplingRow.positions(item.request, drafts, vocab))
        decode_tables = decode_lens = None
        if decodes:
            width = max(-(-(d.start + 1) // bs) for d in decodes)
            table = np.zeros((len(decodes), width), dtype=np.int32)  # padding: the null block
            for row, d in enumerate(decodes):
                n = -(-(d.start + 1) // bs)
                table[row, :n] = d.block_ids[:n]
            decode_tables = mx.array(table)
            decode_lens = mx.array([d.start + 1 for d in decodes], dtype=mx.int32)
        attention = AttentionMetadata(
            positions=mx.array(np.concatenate(positions), dtype=mx.int32),
            slot_mapping=mx.array(np.concatenate(slots), dtype=mx.int32),
            num_decodes=len(decodes),
            decode_block_tables=decode_tables,
            decode_seq_lens=decode_lens,
            prefills=tuple(segments),
            block_size=bs,
        )
        token_ids = mx.array(tokens, dtype=mx.int32)
        sources: dict[int, tuple[mx.array, list[int], list[int]]] = {}
        for at, (src, row) in zip(unseen_at, unseen_src, strict=True):
            _, ats, rows = sources.setdefault(id(src), (src, [], []))
            ats.append(at)
            rows.append(row)
        for src, ats, rows in sources.values():  # early- and late-sampled rows of one step
            picked = src[mx.array(rows, dtype=mx.int32)].astype(mx.int32)
            token_ids[mx.array(ats, dtype=mx.int32)] = picked
        return ModelInput(
            token_ids=token_ids,
            attention=attention,
            logits_indices=mx.array(logits_indices, dtype=mx.int32),
            sampling=tuple(sampling),
            sampling_rows=tuple(sampling_rows),
            late_requests=tuple(late_requests),
            token_slots=token_slots,
            pooled=tuple(pooled),
        )
