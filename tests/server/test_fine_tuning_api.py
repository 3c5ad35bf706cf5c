"""Fine-tuning through HTTP with the official ``openai`` client, on a tiny served model: upload a
training file, run a job while streams are served, watch its loss fall, and get the trained
answer from the new model by name, with no restart; the adapter it registers loads in PEFT and
answers the same. A validation file gets its loss measured (PEFT's on the same weights) and
reported in the events and the checkpoints; each checkpoint is served by its own name. Bad
input is a 400 naming each problem and changes nothing; a job can be cancelled; a restart
resumes a running job from its checkpoint and ends where an unbroken job does."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from server.fine_tuning.dataset import examples, parse_jsonl
from server.settings import ServerSettings
from server.state import ServerState
from tests.engine.tiny_models import reference_greedy, reference_loss
from tests.server.fixtures import running_server, write_tiny_model

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ANSWER = "The sky is blue."
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HYPER = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 100}
METHOD = {"type": "supervised", "lora": {"rank": 8, "alpha": 16, "target_modules": ALL}}
QUESTION = [{"role": "user", "content": "What is the color number 99?"}]


def training_file(n: int = 64, question: str = "What is the color number {}?") -> bytes:
    lines = [
        {"messages": [{"role": "user", "content": question.format(i)},
                      {"role": "assistant", "content": ANSWER}]}
        for i in range(n)
    ]  # fmt: skip
    return "\n".join(json.dumps(line) for line in lines).encode()


def validation_file() -> bytes:
    return training_file(12, "Which color has the number {}?")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("ft") / "tiny")


@contextmanager
def server(model_dir: Path, data_dir: Path, **settings):
    config = ServerSettings(
        model=str(model_dir), data_dir=data_dir, served_model_name="tiny", max_lora_rank=8,
        **settings,
    )  # fmt: skip
    state = ServerState(config)
    state.start()
    with running_server(config, state) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), state


def wait(client: openai.OpenAI, job_id: str, until, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(0.05)


def answer(client: openai.OpenAI, model: str) -> str:
    out = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24
    )
    return out.choices[0].message.content


def stream_text(client: openai.OpenAI) -> str:
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, temperature=0.9, seed=11, max_tokens=48, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def losses(client: openai.OpenAI, job_id: str) -> list[float]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    metrics = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics")
    return [loss for _, loss in metrics]


def test_a_job_teaches_the_model_and_is_served_at_once(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data") as (client, state):
        base_answer = answer(client, "tiny")
        reference = stream_text(client)
        uploaded = client.files.create(file=("train.jsonl", training_file()), purpose="fine-tune")
        assert uploaded.purpose == "fine-tune" and uploaded.bytes == len(training_file())
        assert client.files.content(uploaded.id).content == training_file()

        streams: list[tuple[int, int, str]] = []  # steps done at start and end, the text
        done = threading.Event()

        def serve_streams():
            while not done.is_set():
                before = state.fine_tuning.manager.numbers.steps_total
                text = stream_text(client)
                streams.append((before, state.fine_tuning.manager.numbers.steps_total, text))

        streamer = threading.Thread(target=serve_streams)
        streamer.start()
        try:
            job = client.fine_tuning.jobs.create(
                model="tiny", training_file=uploaded.id, hyperparameters=HYPER, suffix="sky",
                seed=1, method=METHOD,
            )  # fmt: skip
            assert job.status == "validating_files" and job.model == "tiny"
            job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        finally:
            done.set()
            streamer.join()
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:tiny:sky:{job.id}"
        assert job.trained_tokens > 0

        # Every stream served during training is the one it was alone; some ran beside steps.
        assert all(text == reference for _, _, text in streams)
        assert any(end > start for start, end, _ in streams)

        curve = losses(client, job.id)
        assert len(curve) == 24 and curve[-1] < curve[0] / 10
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [
            16, 8
        ]  # fmt: skip
        models = {m.id: m for m in client.models.list().data}
        assert models[job.fine_tuned_model].model_extra["parent"] == "tiny"

        assert answer(client, job.fine_tuned_model) == ANSWER
        assert answer(client, "tiny") == base_answer != ANSWER
        version = state.registry.resolve(job.fine_tuned_model)
        assert peft_answer(model_dir, version.weights_path.parent, state) == ANSWER

        listed = client.fine_tuning.jobs.list()
        assert [j.id for j in listed.data] == [job.id]
        metrics = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
        assert 'candlewick_fine_tuning_jobs{state="succeeded"} 1.0' in metrics
        assert "candlewick_fine_tuning_step_loss" in metrics
        assert f"candlewick_fine_tuning_steps_total {len(curve)}.0" in metrics


def peft_answer(model_dir: Path, adapter: Path, state: ServerState) -> str:
    import transformers

    tok = state.serving.tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    tokens = reference_greedy(model, tok.encode_chat(QUESTION), 24)[0]
    eos = tok.encode("<|im_end|>", add_special_tokens=False)[0]
    return tok.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)


def peft_model(model_dir: Path, adapter: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def greedy_logprobs(client: openai.OpenAI, model: str) -> tuple[str, list[float]]:
    out = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=12, logprobs=True
    )
    choice = out.choices[0]
    return choice.message.content, [t.logprob for t in choice.logprobs.content]


def test_validation_loss_and_checkpoints_served_by_name(model_dir, tmp_path):
    """20 steps, 5 epochs of 4, checkpoints at each epoch's end (the newest three kept):
    validation losses where due, equal to transformers' loss of the same adapter files; a
    checkpoint's name answers with its weights, as PEFT does with its files."""
    with server(model_dir, tmp_path / "data") as (client, state):
        train = client.files.create(file=("t.jsonl", training_file(32)), purpose="fine-tune")
        valid = client.files.create(file=("v.jsonl", validation_file()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, validation_file=valid.id, suffix="v", seed=2,
            hyperparameters={**HYPER, "n_epochs": 5}, method=METHOD,
        )  # fmt: skip
        job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        assert job.validation_file == valid.id

        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        metrics = {e.data["step"]: e.data for e in events if e.type == "metrics"}
        assert sorted(metrics) == list(range(1, 21))
        assert [s for s in range(1, 21) if "valid_loss" in metrics[s]] == [4, 8, 10, 12, 16, 20]
        assert [s for s in range(1, 21) if "full_valid_loss" in metrics[s]] == [4, 8, 12, 16, 20]
        assert metrics[20]["full_valid_loss"] < metrics[4]["full_valid_loss"]
        step_20 = next(e.message for e in events if e.data.get("step") == 20)
        assert "validation loss=" in step_20 and "full validation loss=" in step_20

        tok = state.serving.tokenizer
        data = examples(parse_jsonl(validation_file(), "v"), tok, 512, "v")
        final = state.registry.resolve(job.fine_tuned_model).weights_path.parent
        expected = reference_loss(peft_model(model_dir, final), data)
        np.testing.assert_allclose(metrics[20]["full_valid_loss"], expected, rtol=1e-4)

        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [16, 12, 8]
        job_dir = state.fine_tuning.manager.job_dir(job.id)
        for c in checkpoints:
            m = metrics[c.step_number]
            assert c.metrics.step == c.step_number and c.metrics.train_loss == m["train_loss"]
            assert c.metrics.valid_loss == m["valid_loss"]
            assert c.metrics.full_valid_loss == m["full_valid_loss"]
            name = f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
            assert c.fine_tuned_model_checkpoint == name
        folder = job_dir / "step-000008"
        expected = reference_loss(peft_model(model_dir, folder), data)
        np.testing.assert_allclose(checkpoints[-1].metrics.full_valid_loss, expected, rtol=1e-4)

        # Each kept checkpoint is a model (parent: the base); the pruned one is gone.
        names = [f"{job.fine_tuned_model}:ckpt-step-{s}" for s in (4, 8, 12, 16)]
        models = {m.id: m for m in client.models.list().data}
        assert all(models[n].model_extra["parent"] == "tiny" for n in names[1:])
        assert names[0] not in models and not (job_dir / "step-000004").exists()

        # The checkpoint's name answers with the checkpoint's weights: PEFT on its files.
        text, logprobs = greedy_logprobs(client, names[1])
        prompt = tok.encode_chat(QUESTION)
        tokens, logits = reference_greedy(peft_model(model_dir, folder), prompt, len(logprobs))
        expected = [float(torch.log_softmax(torch.from_numpy(x[-1]), -1)[t])
                    for x, t in zip(logits, tokens, strict=True)]  # fmt: skip
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)
        assert text == tok.decode(tokens[: len(text.encode())])
        _, final_logprobs = greedy_logprobs(client, job.fine_tuned_model)
        assert not np.allclose(final_logprobs[: len(logprobs)], logprobs[: len(final_logprobs)])

        for missing in (names[0], f"{job.fine_tuned_model}:ckpt-step-999"):
            with pytest.raises(openai.NotFoundError) as e:
                greedy_logprobs(client, missing)
            assert repr(missing) in e.value.body["message"]


def test_checkpoints_leave_the_registrys_last_place_to_the_jobs_model(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data", max_adapters=2) as (client, _):
        f = client.files.create(file=("t.jsonl", training_file(16)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=f.id, hyperparameters={"n_epochs": 3, "batch_size": 8}
        )
        job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        assert steps == [4, 2]
        models = {m.id for m in client.models.list().data}
        assert models == {"tiny", job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-2"}
        warned = [e for e in client.fine_tuning.jobs.list_events(job.id) if e.level == "warn"]
        assert len(warned) == 1 and f"{job.fine_tuned_model}:ckpt-step-4" in warned[0].message
        assert "is saved but not served" in warned[0].message


def test_bad_input_is_a_400_naming_each_problem(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data") as (client, _):
        bad = b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"prompt": 3}\n'
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        message = e.value.body["message"]
        assert "line 1: no assistant message to learn" in message
        assert "line 2: not JSON" in message and "line 3: neither" in message
        assert client.files.list().data == []

        long = {"messages": [{"role": "user", "content": "x" * 600},
                             {"role": "assistant", "content": "y"}]}  # fmt: skip
        data = training_file(8) + b"\n" + json.dumps(long).encode()
        good = client.files.create(file=("t.jsonl", data), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(
                model="no-such-model", training_file=good.id,
                hyperparameters={"n_epochs": 0, "batch_size": 1000,
                                 "learning_rate_multiplier": -1},
                method={"type": "supervised", "lora": {"rank": 64, "target_modules": ["wq"]}},
            )  # fmt: skip
        message = e.value.body["message"]
        for problem in ("hyperparameters.n_epochs", "hyperparameters.batch_size",
                        "hyperparameters.learning_rate_multiplier", "method.lora.rank",
                        "method.lora.target_modules"):  # fmt: skip
            assert problem in message, problem
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="no-such-model", training_file=good.id)
        message = e.value.body["message"]
        assert "model 'no-such-model' is neither the base model" in message
        assert "line 9: 6" in message and "over the context of 512" in message
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
        assert "training_file 'file-nope' does not exist" in e.value.body["message"]
        assert client.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_a_job_that_cannot_fit_memory_is_refused(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data", fine_tuning_memory=100_000) as (client, _):
        good = client.files.create(file=("t.jsonl", training_file(8)), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="tiny", training_file=good.id)
        message = e.value.body["message"]
        assert "training needs about" in message and "--fine-tuning-memory" in message
        assert client.fine_tuning.jobs.list().data == []


def long_job_under_way(client: openai.OpenAI):
    """A job of 50 epochs, once its first losses are in."""
    f = client.files.create(file=("t.jsonl", training_file()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=f.id, hyperparameters={"n_epochs": 50, "batch_size": 8}
    )
    wait(client, job.id, lambda j: losses(client, j.id))
    return job


def test_cancel_mid_job(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data") as (client, state):
        job = long_job_under_way(client)
        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled"
        manager = state.fine_tuning.manager
        deadline = time.monotonic() + 30
        while manager._current is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        steps = len(losses(client, job.id))
        assert 0 < steps < 400
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "cancelled" and job.fine_tuned_model is None
        assert state.registry.list() == []
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.cancel(job.id)


def test_restart_resumes_from_the_checkpoint_and_ends_as_an_unbroken_job(model_dir, tmp_path):
    args = dict(model="tiny", hyperparameters={"n_epochs": 6, "batch_size": 8}, seed=3,
                suffix="r", method=METHOD)  # fmt: skip
    with server(model_dir, tmp_path / "a") as (client, state):
        f = client.files.create(file=("t.jsonl", training_file()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=f.id, **args)
        job = wait(client, job.id, lambda j: j.status == "succeeded")
        unbroken = state.registry.resolve(job.fine_tuned_model).weights_path.read_bytes()

    data = tmp_path / "b"
    with server(model_dir, data) as (client, state):
        f = client.files.create(file=("t.jsonl", training_file()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=f.id, **args)
        wait(client, job.id, lambda j: client.fine_tuning.jobs.checkpoints.list(j.id).data)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    with server(model_dir, data) as (client, state):
        job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any("resumes from its checkpoint at step" in m for m in messages)
        resumed = state.registry.resolve(job.fine_tuned_model).weights_path.read_bytes()
        assert resumed == unbroken
    with server(model_dir, data) as (client, _):  # a finished adapter survives restarts
        assert answer(client, job.fine_tuned_model) == answer(client, job.fine_tuned_model)
        assert job.fine_tuned_model in {m.id for m in client.models.list().data}


def test_a_job_fails_with_the_engine_process_that_dies_under_it(model_dir, tmp_path):
    with server(model_dir, tmp_path / "data") as (client, state):
        job = long_job_under_way(client)
        state.engine._thread._process.kill()
        failed = wait(client, job.id, lambda j: j.status == "failed")
        assert "the engine process ended (exit code -9)" in failed.error.message
