"""LoRA training against PyTorch + PEFT: on tiny random llama and qwen2 models, 20 steps from the
same initial weights, data order and hyperparameters give the same per-step losses (transformers'
own loss over the same labels) and the same final adapter weights; so does a run continuing from
a PEFT adapter. Also: a stopped run resumed from its state ends where an unbroken one does;
micro-batch size, layer checkpointing and a quantized base change nothing they should not. The
validation loss a run reports (a sampled batch at an interval, all the examples at checkpoints
and the end) is PEFT's loss of the same adapter weights on the same examples."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from adapters.format import parse_adapter
from engine.loader.hf import load_hf_model
from engine.lora.request import LoRAWeights
from engine.training.data import Example, RunPlan
from engine.training.lora import LoRASpec, init_lora, projection_shapes
from engine.training.trainer import Trainer, TrainingConfig
from engine.training.validation import ValidationPlan
from engine.training.work import Checkpointed, Finished, StepDone, TrainingRun, TrainingWork
from tests.engine.tiny_models import VOCAB, build_tiny, hf_batch, reference_loss

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 20
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = {m: ("self_attn." if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + m
         for m in MODULES}  # fmt: skip
CONFIG = TrainingConfig(
    learning_rate=3e-3,
    n_epochs=4,
    batch_size=5,
    micro_batch_size=2,
    warmup_steps=3,
    schedule="linear",
    weight_decay=0.01,
    seed=7,
)


def examples(n: int = 24, seed: int = 0) -> list[Example]:
    """Sequences of 4..24 tokens learning a random tail (and some a middle span too)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 25))
        tokens = rng.integers(3, VOCAB, size=length).astype(np.int32)
        learn = np.zeros(length, bool)
        learn[int(rng.integers(1, length)) :] = True
        if length > 10 and rng.random() < 0.5:
            learn[2:5] = True
        out.append(Example(tokens, learn))
    return out


def random_lora(model, spec: LoRASpec, seed: int) -> dict:
    """Initial weights with B nonzero too, so every step moves both matrices."""
    rng = np.random.default_rng(seed)
    return {
        key: LoRAWeights(a=w.a, b=(0.2 * rng.standard_normal(w.b.shape)).astype(np.float32),
                         scale=w.scale)
        for key, w in init_lora(projection_shapes(model), spec, seed).items()
    }  # fmt: skip


def peft_run(peft_model, data: list[Example], config: TrainingConfig, steps: int):
    """The same run in PyTorch: AdamW, transformers' linear warmup schedule, gradient
    accumulation, and transformers' causal-LM loss over labels -100 outside the mask, divided by
    the step's count of target tokens (``num_items_in_batch``)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.betas, eps=config.eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    plan = RunPlan(len(data), config.n_epochs, config.batch_size, config.micro_batch_size,
                   config.seed)  # fmt: skip
    sched = transformers.get_linear_schedule_with_warmup(opt, config.warmup_steps, plan.total_steps)
    losses = []
    for step in range(steps):
        batches = plan.micro_batches(step)
        n = sum(data[i].num_learned for b in batches for i in b)
        total = 0.0
        for batch in batches:
            batch_data = [data[i] for i in batch]
            out = peft_model(**hf_batch(batch_data), num_items_in_batch=torch.tensor(n))
            out.loss.backward()
            total += out.loss.item()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def peft_weights(peft_model) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            path = ".".join(parts[-2:])
            a = module.lora_A["default"].weight.detach().numpy()
            b = module.lora_B["default"].weight.detach().numpy()
            out[(layer, path)] = (a, b)
    return out


def load_into_peft(peft_model, modules: dict) -> None:
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                parts = name.split(".")
                key = (int(parts[parts.index("layers") + 1]), ".".join(parts[-2:]))
                module.lora_A["default"].weight.copy_(torch.from_numpy(modules[key].a))
                module.lora_B["default"].weight.copy_(torch.from_numpy(modules[key].b))


def assert_same_run(ours: list[float], theirs: list[float], trainer, peft_model) -> None:
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert np.mean(ours[-5:]) < np.mean(ours[:5]), "training did not lower the loss"
    expected = peft_weights(peft_model)
    got = trainer.weights()
    assert set(got) == set(expected)
    for key, w in got.items():
        np.testing.assert_allclose(w.a, expected[key][0], atol=1e-4, err_msg=str(key))
        np.testing.assert_allclose(w.b, expected[key][1], atol=1e-4, err_msg=str(key))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / "base"
    build_tiny(request.param, folder)
    return folder


def test_twenty_steps_equal_peft(base):
    spec = LoRASpec(rank=4, alpha=8, target_modules=tuple(PATHS[m] for m in MODULES))
    model = load_hf_model(base, mx.float32)
    data = examples()
    initial = random_lora(model, spec, seed=3)
    trainer = Trainer(model, data, initial, CONFIG)
    ours = [trainer.train_step().loss for _ in range(STEPS)]

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, config)
    load_into_peft(peft_model, initial)
    theirs = peft_run(peft_model, data, CONFIG, STEPS)
    assert_same_run(ours, theirs, trainer, peft_model)


def test_continued_run_equals_peft(base, tmp_path):
    """Continue from a PEFT adapter (attention only, a per-module rank and alpha)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 6}, alpha_pattern={"v_proj": 3}, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(5)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "parent")
    parsed = parse_adapter(
        (tmp_path / "parent/adapter_config.json").read_bytes(),
        (tmp_path / "parent/adapter_model.safetensors").read_bytes(),
        load_hf_model(base, mx.float32).config,
        max_rank=16,
        max_bytes=1 << 30,
    )
    model = load_hf_model(base, mx.float32)
    trainer = Trainer(model, examples(seed=1), parsed.modules, CONFIG)
    ours = [trainer.train_step().loss for _ in range(STEPS)]

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "parent", is_trainable=True)
    theirs = peft_run(peft_model, examples(seed=1), CONFIG, STEPS)
    assert_same_run(ours, theirs, trainer, peft_model)


def peft_loss(base: Path, modules: dict, data: list[Example]) -> float:
    """transformers' mean loss over the target tokens of ``data`` with ``modules`` in PEFT."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, config)
    load_into_peft(peft_model, modules)
    return reference_loss(peft_model, data)


def test_validation_loss_equals_peft(base):
    """20 steps (4 epochs of 5) validated every 3 steps on 11 examples (batches of 5) with
    dropout in training: the losses at each checkpoint and at the end are PEFT's forward of the
    adapter weights of that moment; validating changes nothing in training."""
    spec = LoRASpec(rank=4, alpha=8, target_modules=tuple(PATHS[m] for m in MODULES))
    model = load_hf_model(base, mx.float32)
    data, valid = examples(), examples(11, seed=9)
    config = TrainingConfig(**{**_fields(CONFIG), "dropout": 0.1})
    initial = random_lora(model, spec, seed=3)
    events = []
    run = TrainingRun(data, initial, config, validation=valid, validate_every=3)
    work = TrainingWork(model, run, events.append)
    while work.run_unit():
        pass
    steps = {e.report.step: e for e in events if isinstance(e, StepDone)}
    alone = Trainer(model, data, initial, config)
    assert [steps[s].report.loss for s in range(1, 21)] == [
        alone.train_step().loss for _ in range(20)
    ]
    assert sorted(s for s, e in steps.items() if e.valid_loss is not None) == [
        3, 5, 6, 9, 10, 12, 15, 18, 20
    ]  # fmt: skip
    assert sorted(s for s, e in steps.items() if e.full_valid_loss is not None) == [5, 10, 15, 20]
    saved = {e.step: e.weights for e in events if isinstance(e, Checkpointed)}
    saved[20] = next(e.weights for e in events if isinstance(e, Finished))
    plan = ValidationPlan(valid, config.batch_size, config.micro_batch_size, 3, config.seed)
    assert len(plan.batch(5)) == 5 and plan.batch(5) != plan.batch(10)
    for step, weights in saved.items():
        full = peft_loss(base, weights, valid)
        batch = peft_loss(base, weights, [valid[i] for i in plan.batch(step)])
        np.testing.assert_allclose(steps[step].full_valid_loss, full, rtol=1e-4, err_msg=step)
        np.testing.assert_allclose(steps[step].valid_loss, batch, rtol=1e-4, err_msg=step)
    assert steps[20].full_valid_loss != steps[5].full_valid_loss


def test_resumed_run_ends_where_an_unbroken_one_does(base):
    spec = LoRASpec(rank=2, alpha=4, target_modules=("self_attn.q_proj", "mlp.down_proj"))
    model = load_hf_model(base, mx.float32)
    data = examples(12)
    config = TrainingConfig(learning_rate=1e-2, n_epochs=3, batch_size=4, micro_batch_size=3,
                            dropout=0.1, seed=2)  # fmt: skip
    initial = init_lora(projection_shapes(model), spec, seed=1)
    whole = Trainer(model, data, initial, config)
    losses = [whole.train_step().loss for _ in range(whole.plan.total_steps)]
    first = Trainer(model, data, initial, config)
    for _ in range(4):
        first.train_step()
    rest = Trainer(model, data, initial, config, resume=first.state())
    resumed = [rest.train_step().loss for _ in range(rest.plan.total_steps - 4)]
    assert rest.done and resumed == losses[4:]
    for key, w in whole.weights().items():
        np.testing.assert_array_equal(rest.weights()[key].a, w.a)
        np.testing.assert_array_equal(rest.weights()[key].b, w.b)


@pytest.mark.parametrize("variant", ["one-micro-batch", "checkpoint-layers"])
def test_accumulation_and_checkpointing_change_nothing(base, variant):
    spec = LoRASpec(rank=4, alpha=4, target_modules=("self_attn.v_proj", "mlp.up_proj"))
    model = load_hf_model(base, mx.float32)
    data = examples(10)
    initial = random_lora(model, spec, seed=4)
    reference = Trainer(model, data, initial, CONFIG)
    if variant == "one-micro-batch":
        other = TrainingConfig(**{**_fields(CONFIG), "micro_batch_size": CONFIG.batch_size})
    else:
        other = TrainingConfig(**{**_fields(CONFIG), "checkpoint_layers": True})
    trainer = Trainer(model, data, initial, other)
    for _ in range(4):
        np.testing.assert_allclose(trainer.train_step().loss, reference.train_step().loss,
                                   rtol=1e-5)  # fmt: skip


def test_quantized_base_trains_as_its_dequantized_weights(base):
    """QLoRA: on a 4-bit base, the same run as on a float model holding exactly the weights the
    quantized layers compute with."""
    from engine.loader.quantize import quantize_choice

    spec = LoRASpec(rank=4, alpha=8, target_modules=("self_attn.q_proj", "mlp.gate_proj"))
    quantized = load_hf_model(base, mx.float32, quantize=quantize_choice("q4", 32))
    dense = load_hf_model(base, mx.float32)
    dense_modules = dict(dense.named_modules())
    for path, q in quantized.named_modules():
        if hasattr(q, "scales"):
            w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
            dense_modules[path].weight = w
    data = examples(8)
    initial = random_lora(dense, spec, seed=2)
    config = TrainingConfig(learning_rate=1e-2, n_epochs=1, batch_size=4, micro_batch_size=4)
    q_run = Trainer(quantized, data, initial, config)
    d_run = Trainer(dense, data, initial, config)
    assert hasattr(quantized.model.layers[0].self_attn.q_proj, "scales")
    for _ in range(2):
        np.testing.assert_allclose(q_run.train_step().loss, d_run.train_step().loss, rtol=1e-4)


def _fields(config: TrainingConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
