"""Turning a scheduled step into one forward pass over the paged cache and sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from adapters.slots import AdapterSlots
from engine.models.base import CausalLM
from engine.models.paged import AttentionMetadata, PagedKVStore, PrefillSegment
from engine.outputs import ModelRunnerOutput, TokenLogprob
from engine.sampler import SampledArrays, Sampler
from engine.sampling_metadata import SamplingMetadata
from engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True, slots=True)
class ModelInput:
    """A step's tokens flattened into one row, decodes first, and what to sample from.

    ``logits_indices[j]`` is the flat index of the last token of ``sampling[j]``: the rows whose
    computed tokens reach the end of what they know, and so produce a token.
    """

    token_ids: mx.array  # [T] int32
    attention: AttentionMetadata
    logits_indices: mx.array  # [R] int32
    sampling: tuple[ScheduledRequest, ...]
    token_slots: list[int]  # [T] each token's adapter slot (0: the base model)


@dataclass(frozen=True, slots=True)
class InFlightStep:
    """A submitted step: which requests sample, and their tokens still on the device."""

    ids: tuple[str, ...]
    sampled: SampledArrays | None


class ModelRunner:
    """Owns the model and the device KV pools; only the engine thread calls it."""

    def __init__(
        self, model: CausalLM, store: PagedKVStore, slots: AdapterSlots | None = None
    ) -> None:
        self.model = model
        self.store = store
        self.slots = slots
        self.sampler = Sampler()
        self.windows = [layer.window for layer in model.model.layers]
        self._device_tokens: dict[str, tuple[mx.array, int]] = {}

    def execute_model(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its tokens."""
        return self.collect(self.submit(output))

    def submit(self, output: SchedulerOutput) -> InFlightStep:
        """Queue one step on the device and return at once: the caller prepares the next step
        while this one computes, and ``collect``s it afterwards."""
        if not output.scheduled:
            return InFlightStep(ids=(), sampled=None)
        inputs = self.prepare_inputs(output)
        if self.slots is not None:
            self.slots.set_step(inputs.token_slots)
        caches = self.store.layer_caches(inputs.attention, self.windows)
        hidden = self.model.hidden(inputs.token_ids[None], caches)[0]  # [T, hidden]
        if not inputs.sampling:
            mx.async_eval(self.store.state)
            return InFlightStep(ids=(), sampled=None)
        logits = self.model.logits(hidden[inputs.logits_indices])  # [R, vocab]
        requests = [item.request for item in inputs.sampling]
        meta = SamplingMetadata.from_requests(requests, logits.shape[-1])
        sampled = self.sampler.submit(logits, meta)
        mx.async_eval(self.store.state)
        ids = tuple(r.request_id for r in requests)
        # The next step may consume these tokens before anyone reads them.
        self._device_tokens = {rid: (sampled.tokens, row) for row, rid in enumerate(ids)}
        return InFlightStep(ids=ids, sampled=sampled)

    def collect(self, step: InFlightStep) -> ModelRunnerOutput:
        """The sampled tokens of a submitted step (waits for the device)."""
        if step.sampled is None:
            return ModelRunnerOutput()
        result = self.sampler.resolve(step.sampled)
        logprobs = {
            step.ids[row]: TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=tuple(zip(lp.top_token_ids, lp.top_logprobs, strict=True)),
            )
            for row, lp in enumerate(result.logprobs)
            if lp is not None
        }
        return ModelRunnerOutput(
            sampled=dict(zip(step.ids, result.token_ids, strict=True)), logprobs=logprobs
        )

    def prepare_inputs(self, output: SchedulerOutput) -> ModelInput:
        bs = self.store.block_size
        decodes = [s for s in output.scheduled if s.num_tokens == 1]
        prefills = [s for s in output.scheduled if s.num_tokens > 1]
        tokens: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        segments: list[PrefillSegment] = []
        sampling: list[ScheduledRequest] = []
        logits_indices: list[int] = []
        token_slots: list[int] = []
        unseen_at: list[int] = []  # flat indices whose token is still on the device
        unseen_src: list[tuple[mx.array, int]] = []
        for item in decodes + prefills:
            start = len(tokens)
            all_ids = item.request.all_token_ids
            known = all_ids[item.start : item.start + item.num_tokens]
            tokens.extend(known)
            if len(known) < item.num_tokens:  # the last token was sampled by the step in flight
                assert len(known) == item.num_tokens - 1, "at most one token is unseen"
                unseen_at.append(len(tokens))
                unseen_src.append(self._device_tokens[item.request.request_id])
                tokens.append(0)
            token_slots.extend([item.request.lora_slot] * item.num_tokens)
            pos = np.arange(item.start, item.start + item.num_tokens)
            table = np.asarray(item.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if item.num_tokens > 1:
                n_blocks = -(-(item.start + item.num_tokens) // bs)
                segments.append(
                    PrefillSegment(
                        start=start,
                        length=item.num_tokens,
                        seq_len=item.start + item.num_tokens,
                        block_table=mx.array(table[None, :n_blocks], dtype=mx.int32),
                    )
                )
            if item.samples:
                sampling.append(item)
                logits_indices.append(len(tokens) - 1)
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
        if unseen_at:
            source = unseen_src[0][0]
            assert all(src is source for src, _ in unseen_src), "unseen tokens from one step"
            rows = mx.array([row for _, row in unseen_src], dtype=mx.int32)
            token_ids[mx.array(unseen_at, dtype=mx.int32)] = source[rows].astype(mx.int32)
        return ModelInput(
            token_ids=token_ids,
            attention=attention,
            logits_indices=mx.array(logits_indices, dtype=mx.int32),
            sampling=tuple(sampling),
            token_slots=token_slots,
        )
