"""The scheduler in pure Python (no MLX, no model): a scripted run of adds, steps, finishes,
aborts and a preemption, with the exact block ids, adapter slots, phases and adapter loads of
every step. Block ids follow the pool's free queue: blocks 1..N-1 in order at start, a freed
request's blocks appended tail first."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.lora.request import LoRARequest
from engine.lora.slot_table import SlotLoad, SlotTable
from engine.outputs import ModelRunnerOutput
from engine.request import EngineRequest, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput, StepPhase


def lora(name: str) -> LoRARequest:
    def load():
        raise AssertionError("the scheduler never loads weights")

    return LoRARequest(name=name, version=1, key=f"key-{name}", rank=4, load=load)


def add(scheduler: Scheduler, rid: str, prompt: list[int], max_tokens: int, adapter=None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    request = EngineRequest(rid, prompt, params, lora=adapter).to_request()
    scheduler.add_request(request)
    return request


def layout(out: SchedulerOutput) -> list[tuple]:
    """(id, start, num_tokens, block ids, samples, phase, adapter slot) of each scheduled item."""
    return [
        (
            s.request.request_id,
            s.start,
            s.num_tokens,
            s.block_ids,
            s.samples,
            s.phase,
            s.request.lora_slot,
        )
        for s in out.scheduled
    ]


def sample(scheduler: Scheduler, out: SchedulerOutput, tokens: dict[str, int]):
    result = ModelRunnerOutput(sampled={rid: [t] for rid, t in tokens.items()})
    return {o.request_id: o for o in scheduler.update_from_output(out, result)}


def test_scripted_run_exact_blocks_slots_and_loads():
    config = EngineConfig(
        block_size=4, max_num_seqs=4, max_num_batched_tokens=16, long_prefill_chunk=8
    )
    kv = KVCacheManager(num_blocks=9, block_size=4)
    slots = SlotTable(num_slots=1)
    s = Scheduler(config, kv, slots)
    x, y = lora("x"), lora("y")
    a = add(s, "a", list(range(100, 110)), max_tokens=2)
    b = add(s, "b", list(range(200, 206)), max_tokens=2, adapter=x)
    add(s, "c", list(range(300, 305)), max_tokens=2, adapter=y)

    # Step 1: a's first chunk of 8 and all of b fit the budget of 16; c waits for the one slot.
    out = s.schedule()
    P, D = StepPhase.PREFILL, StepPhase.DECODE
    assert layout(out) == [
        ("a", 0, 8, (1, 2), False, P, 0),
        ("b", 0, 6, (3, 4), True, P, 1),
    ]
    assert out.lora_loads == (SlotLoad(1, x),) and out.preempted == ()
    assert [r.request_id for r in s.waiting] == ["c"]
    outs = sample(s, out, {"b": 7})
    assert outs["b"].new_token_ids == (7,) and not outs["b"].finished

    # Step 2: a finishes its prompt in a third block; b decodes; c still waits (slot pinned).
    out = s.schedule()
    assert layout(out) == [
        ("a", 8, 2, (1, 2, 5), True, P, 0),
        ("b", 6, 1, (3, 4), True, D, 1),
    ]
    assert out.lora_loads == ()
    outs = sample(s, out, {"a": 11, "b": 8})
    assert outs["b"].finished and outs["b"].finish_reason == "length"
    assert slots.refs == [0, 0] and list(slots.lru) == [1]

    # Step 3: b's blocks went back tail first (4, then 3) behind 6, 7, 8; c evicts x from the
    # slot and takes blocks 6 and 7.
    out = s.schedule()
    assert layout(out) == [
        ("a", 10, 1, (1, 2, 5), True, D, 0),
        ("c", 0, 5, (6, 7), True, P, 1),
    ]
    assert out.lora_loads == (SlotLoad(1, y),)
    assert slots.key_of == [None, "key-y"] and slots.loads == 2
    outs = sample(s, out, {"a": 12, "c": 9})
    assert outs["a"].finished and outs["a"].new_token_ids == (12,)
    assert a.output_token_ids == [11, 12]
    assert [blk.block_id for blk in kv.block_pool.free_queue] == [8, 4, 3, 5, 2, 1]

    # Abort c: its blocks and its slot come back at once.
    assert s.abort_request("c").status == RequestStatus.FINISHED_ABORTED
    assert s.abort_request("c") is None
    assert [blk.block_id for blk in kv.block_pool.free_queue] == [8, 4, 3, 5, 2, 1, 7, 6]
    assert slots.refs == [0, 0] and not s.has_work
    assert b.lora_slot == 0 and s.stats.num_running == 0


def test_preemption_frees_the_newest_and_its_cached_block_is_hit_later():
    config = EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    kv = KVCacheManager(num_blocks=4, block_size=4)  # blocks 1, 2, 3
    s = Scheduler(config, kv)
    d = add(s, "d", [10, 11, 12, 13], max_tokens=8)
    e = add(s, "e", [20, 21, 22, 23], max_tokens=8)
    P, D = StepPhase.PREFILL, StepPhase.DECODE

    out = s.schedule()
    assert layout(out) == [("d", 0, 4, (1,), True, P, 0), ("e", 0, 4, (2,), True, P, 0)]
    sample(s, out, {"d": 14, "e": 24})

    # Both need a second block; only block 3 is free: e, admitted last, is preempted.
    out = s.schedule()
    assert layout(out) == [("d", 4, 1, (1, 3), True, D, 0)]
    assert out.preempted == ("e",)
    assert e.status == RequestStatus.PREEMPTED and e.num_computed_tokens == 0
    assert e.num_preemptions == 1 and s.stats.num_preemptions == 1
    assert [r.request_id for r in s.waiting] == ["e"]
    sample(s, out, {"d": 15})

    # e's full block 2 is still cached; it needs one more block and none is free: it waits.
    out = s.schedule()
    assert layout(out) == [("d", 5, 1, (1, 3), True, D, 0)]
    sample(s, out, {"d": 16})

    # d ends; e resumes with a prefix hit on block 2 and recomputes only its last token.
    assert s.abort_request("d") is d
    out = s.schedule()
    assert layout(out) == [("e", 4, 1, (2, 3), True, D, 0)]
    assert e.num_cached_tokens == 0  # counted at its first admission only
    assert kv.prefix_cache_stats.hits == 4


def test_drafts_are_scheduled_after_the_newest_token_and_rejected_ones_given_back():
    class Script:
        def __init__(self, drafts):
            self.drafts = drafts

        def propose(self, token_ids, max_tokens):
            return self.drafts[:max_tokens]

    config = EngineConfig(block_size=4, max_num_batched_tokens=64, pipelined=True)
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = Scheduler(config, kv)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    r = EngineRequest("r", [1, 2, 3], params, proposer=Script([7, 8, 9])).to_request()
    s.add_request(r)
    out = s.schedule()
    assert out.sync  # a proposer drafts from the host's tokens: steps never overlap
    assert layout(out) == [("r", 0, 3, (1,), True, StepPhase.PREFILL, 0)]
    sample(s, out, {"r": 6})

    out = s.schedule()
    (item,) = out.scheduled
    assert (item.start, item.num_tokens, item.phase) == (3, 4, StepPhase.VERIFY)
    assert item.draft_token_ids == (7, 8, 9) and item.num_sampled == 4
    assert item.block_ids == (1, 2)
    # Sampled after 6, 7, 8, 9: 7 and 8 match their drafts, then 5 differs from draft 9.
    outs = s.update_from_output(out, ModelRunnerOutput(sampled={"r": [7, 8, 5, 4]}))
    assert outs[0].new_token_ids == (7, 8, 5)
    assert r.output_token_ids == [6, 7, 8, 5]
    assert r.num_computed_tokens == 6  # 1, 2, 3, 6, 7, 8; draft 9's KV is dropped
