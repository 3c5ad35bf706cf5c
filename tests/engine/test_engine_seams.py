"""The engine's seams against its one-token path: k drafts verified in one step = the same tokens
one by one (and the same KV cache); a masked row beside free rows; logits processors on some
rows; two processes fed the same requests make the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.spec.proposer import NgramProposer
from engine.structured.constraint import TokenSet
from tests.engine.test_engine import ARCHS, greedy, make_core, prompts, reference, run
from tests.engine.tiny_models import VOCAB, build_tiny

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    from engine.loader.hf import load_hf_model

    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder)
    return load_hf_model(folder, mx.float32)


class ScriptedDrafts:
    """Drafts that guess the known continuation ``truth`` right for the first j tokens and wrong
    after, with j cycling through 0..k from one step to the next (all rejected .. all kept)."""

    def __init__(self, truth: list[int], prompt_len: int, k: int) -> None:
        self.truth, self.prompt_len, self.k = truth, prompt_len, k
        self.calls = 0
        self.kept_all = 0

    def propose(self, token_ids, max_tokens: int) -> list[int]:
        m = len(token_ids) - self.prompt_len  # outputs so far; the step samples truth[m] first
        j = self.calls % (self.k + 1)
        self.calls += 1
        right = self.truth[m : m + j]
        wrong = [(t + 1) % VOCAB for t in self.truth[m + len(right) : m + self.k]]
        self.kept_all += len(right) == self.k
        return (right + wrong)[:max_tokens]


def kv_rows(core, request_id: str, n: int) -> list[np.ndarray]:
    """Every layer's keys and values of the request's first ``n`` positions."""
    bs = core.config.block_size
    table = np.array(core.kv.get_block_ids(request_id))
    pos = np.arange(n)
    slots = mx.array(table[pos // bs] * bs + pos % bs)
    store = core.runner.store
    return [np.array(store.slot_major(pool)[slots]) for pool in store.keys + store.values]


def step_until(core, request_id: str, num_outputs: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(10 * num_outputs):
        if len(tokens) >= num_outputs:
            break
        for out in core.step():
            assert out.error is None, out.error
            tokens.extend(out.new_token_ids)
    assert len(tokens) >= num_outputs, f"{request_id} made {len(tokens)} tokens"
    return tokens


@pytest.mark.parametrize("k", [1, 3])
def test_verified_drafts_equal_one_token_steps(model, k):
    """Greedy: the tokens, their logprobs and the request's KV cache equal one-by-one decoding,
    whichever prefix of the drafts each step keeps."""
    prompt = prompts(1, seed=21)[0]
    truth = reference(model, prompt, 40)
    params = greedy(40, logprobs=0)
    plain = make_core(model)
    plain.add_request(EngineRequest("r", prompt, params))
    one_by_one = step_until(plain, "r", 16)

    drafts = ScriptedDrafts(truth, len(prompt), k)
    spec = make_core(model)
    spec.add_request(EngineRequest("r", prompt, params, proposer=drafts))
    with_drafts = step_until(spec, "r", 16)
    n = min(len(one_by_one), len(with_drafts))
    assert with_drafts[:n] == one_by_one[:n] == truth[:n]
    assert drafts.kept_all > 0 and drafts.calls < n  # drafts were kept: fewer steps than tokens

    computed = min(r.num_computed_tokens for c in (plain, spec) for r in c.scheduler.running)
    for got, want in zip(kv_rows(spec, "r", computed), kv_rows(plain, "r", computed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_verified_drafts_whole_run_with_logprobs_and_seeded_sampling(model):
    prompt = prompts(1, seed=22)[0]
    seeded = SamplingParams(max_tokens=14, temperature=1.0, seed=77, ignore_eos=True, logprobs=2)
    alone, lps = run(make_core(model), [EngineRequest("s", prompt, seeded)])
    drafts = ScriptedDrafts(alone["s"], len(prompt), 2)
    spec_tokens, spec_lps = run(
        make_core(model), [EngineRequest("s", prompt, seeded, proposer=drafts)]
    )
    assert spec_tokens["s"] == alone["s"]
    np.testing.assert_allclose(spec_lps["s"], lps["s"], rtol=1e-4, atol=1e-4)
    assert drafts.kept_all > 0


def test_ngram_drafts_keep_the_greedy_tokens(model):
    """A real proposer (prompt lookup) on a repetitive prompt: same tokens as without it."""
    prompt = (prompts(1, seed=23)[0][:6]) * 4
    plain, _ = run(make_core(model), [EngineRequest("n", prompt, greedy(20))])
    ngram, _ = run(
        make_core(model), [EngineRequest("n", prompt, greedy(20), proposer=NgramProposer(3))]
    )
    assert ngram == plain


def test_a_masked_row_beside_free_rows(model):
    ps = prompts(4, seed=24)
    free = [
        greedy(10),
        SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=4, ignore_eos=True),
    ]
    alone = {}
    for i, params in enumerate(free):
        alone.update(run(make_core(model), [EngineRequest(f"f{i}", ps[i], params)])[0])
    allowed = {5, 17, 42, 99, 200}
    masked = SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)
    batch = [EngineRequest(f"f{i}", ps[i], p) for i, p in enumerate(free)]
    batch.insert(1, EngineRequest("m", ps[3], masked, constraint=TokenSet(allowed)))
    core = make_core(model)
    tokens, _ = run(core, batch)
    for i in range(len(free)):
        assert tokens[f"f{i}"] == alone[f"f{i}"], f"free row {i}"
    assert len(tokens["m"]) == 10 and set(tokens["m"]) <= allowed
    assert len(set(tokens["m"])) > 1  # sampled within the set, not stuck on one token
    greedy_masked, _ = run(
        make_core(model), [EngineRequest("g", ps[3], greedy(6), constraint=TokenSet({9, 11}))]
    )
    assert set(greedy_masked["g"]) <= {9, 11}


def test_logits_processors_touch_only_their_rows(model):
    ps = prompts(3, seed=25)
    alone, _ = run(make_core(model), [EngineRequest("a", ps[0], greedy(8))])

    def favour_seven(output_ids, logits):
        return logits + 1000.0 * (mx.arange(logits.shape[-1]) == 7)

    def ban_seven_after_three(output_ids, logits):
        if len(output_ids) >= 3:
            logits = mx.where(mx.arange(logits.shape[-1]) == 7, -mx.inf, logits)
        return logits

    processed = EngineRequest(
        "p", ps[1], greedy(8), logits_processors=(favour_seven, ban_seven_after_three)
    )
    tokens, _ = run(make_core(model), [EngineRequest("a", ps[0], greedy(8)), processed])
    assert tokens["a"] == alone["a"]
    assert tokens["p"][:3] == [7, 7, 7] and 7 not in tokens["p"][3:]


_TWIN = """
import json, sys
from pathlib import Path
import mlx.core as mx
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.hf import load_hf_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.engine.test_engine import prompts, run

model = load_hf_model(Path(sys.argv[1]), mx.float32)
core = EngineCore(model, EngineConfig(num_blocks=64, block_size=4), mx.float32)
settings = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.7, top_k=10, presence_penalty=0.5, ignore_eos=True),
]
reqs = [EngineRequest(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts(5, 31), settings))]
tokens, _ = run(core, reqs)
print(json.dumps(tokens, sort_keys=True))
"""


def test_two_engine_processes_make_identical_tokens(tmp_path):
    """No unseeded global random state: unseeded sampling included, and whatever each
    process's hash seed is."""
    folder = tmp_path / "llama"
    build_tiny("llama", folder)
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", _TWIN, str(folder)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        outs.append(json.loads(done.stdout))
    assert outs[0] == outs[1]
    assert outs[0]["r1"] != outs[0]["r0"]  # the unseeded row really sampled


def test_a_cpu_step_computes_rope_tables_once_for_every_layer(model, monkeypatch):
    """On the CPU the cos/sin of a step's positions are computed by the first layer that
    rotates and reused by the rest (queries and keys of every layer)."""
    from engine.models.base import RoPE

    calls = []
    tables = RoPE.tables

    def counted(self, positions, dtype):
        calls.append(positions.shape)
        return tables(self, positions, dtype)

    monkeypatch.setattr(RoPE, "tables", counted)
    assert len(model.model.layers) >= 2
    core = make_core(model)
    forwards = []
    hidden = core.runner.model.hidden
    monkeypatch.setattr(core.runner.model, "hidden", lambda *a: forwards.append(1) or hidden(*a))
    core.add_request(EngineRequest("a", [1, 2, 3, 4, 5], greedy(3)))
    while core.has_work:
        core.step()
    # one per forward pass (prefill, then each decode), not two per layer
    assert len(calls) == len(forwards) == 3


def test_the_cpu_head_major_store_and_the_gpu_slot_major_store_give_the_same_steps(model):
    """Pools kept head-major ([Hkv, slots, D], the CPU's layout) and the GPU kernels' slot-major
    one run the same steps on the CPU: chunked prefills reading earlier
    blocks, decodes, prefix-cache hits, with the same tokens, and logprobs and keys in every
    slot equal to float32 rounding."""
    from engine.models.paged import PagedKVStore

    def core(head_major: bool):
        c = make_core(model, max_num_batched_tokens=16, long_prefill_chunk=8)
        store = c.runner.store
        c.runner.store = PagedKVStore(
            model.config, store.num_blocks, store.block_size, mx.float32, head_major=head_major
        )
        return c

    shared = prompts(1, seed=7)[0]
    reqs = [
        EngineRequest(f"r{i}", shared + p, greedy(10, logprobs=0))
        for i, p in enumerate(prompts(5, seed=3))
    ]
    head, slot = core(True), core(False)
    assert head.runner.store.head_major and not slot.runner.store.head_major
    (head_tokens, head_lps), (slot_tokens, slot_lps) = run(head, reqs), run(slot, reqs)
    assert head_tokens == slot_tokens
    # float32 rounding apart: the head-major path takes its softmax in NumPy, the slot-major
    # one here MLX's (this model's head size sends it to the reference)
    for rid, lps in head_lps.items():
        assert np.allclose(lps, slot_lps[rid], rtol=0, atol=1e-5), rid
    for a, b in zip(head.runner.store.state, slot.runner.store.state, strict=True):
        assert mx.allclose(head.runner.store.slot_major(a), b, rtol=0, atol=1e-5).item()
