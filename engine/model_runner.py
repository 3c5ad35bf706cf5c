"""Turning a scheduled step into one forward pass over the paged cache and sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from adapters.slots import AdapterSlots
from engine.models.base import CausalLM
from engine.models.paged import AttentionMetadata, PagedKVStore, PrefillSegment
from engine.outputs import ModelRunnerOutput, TokenLogprob
from engine.sampler import Sampler
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

    def execute_model(self, output: SchedulerOutput) -> ModelRunnerOutput:
        if not output.scheduled:
            return ModelRunnerOutput()
        inputs = self.prepare_inputs(output)
        if self.slots is not None:
            self.slots.set_step(inputs.token_slots)
        caches = self.store.layer_caches(inputs.attention, self.windows)
        hidden = self.model.hidden(inputs.token_ids[None], caches)[0]  # [T, hidden]
        if not inputs.sampling:
            mx.eval(self.store.state)
            return ModelRunnerOutput()
        logits = self.model.logits(hidden[inputs.logits_indices])  # [R, vocab]
        requests = [item.request for item in inputs.sampling]
        meta = SamplingMetadata.from_requests(requests, logits.shape[-1])
        result = self.sampler(logits, meta)
        mx.eval(self.store.state)
        ids = [r.request_id for r in requests]
        logprobs = {
            ids[row]: TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=tuple(zip(lp.top_token_ids, lp.top_logprobs, strict=True)),
            )
            for row, lp in enumerate(result.logprobs)
            if lp is not None
        }
        return ModelRunnerOutput(
            sampled=dict(zip(ids, result.token_ids, strict=True)), logprobs=logprobs
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
        for item in decodes + prefills:
            start = len(tokens)
            all_ids = item.request.all_token_ids
            tokens.extend(all_ids[item.start : item.start + item.num_tokens])
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
        return ModelInput(
            token_ids=mx.array(tokens, dtype=mx.int32),
            attention=attention,
            logits_indices=mx.array(logits_indices, dtype=mx.int32),
            sampling=tuple(sampling),
            token_slots=token_slots,
        )
