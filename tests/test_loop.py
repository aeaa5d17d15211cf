"""The loop's options for bigger models on smaller GPUs: the precision chosen by the card, float16
with its gradient scaler, gradient accumulation (N micro-batches make the update one batch
makes), the learning-rate schedule and warmup, gradient clipping, and the memory estimate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classify
import data
import distributed
import fastpath
import gpt
import runner
import train
from test_train import run_in, tiny_args, workspace  # noqa: F401 (workspace: a fixture)

FEW = settings(max_examples=15, deadline=None)


# --------------------------------------------------------------------------- precision chosen by the card


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                      ((7, 5), torch.float16), ((7, 0), torch.float16),
                                                      ((6, 1), torch.float32), ((5, 2), torch.float32)])
def test_auto_picks_bfloat16_only_on_cards_with_bfloat16_hardware(capability, expected, monkeypatch):
    """A T4 (7.5) computes in float16 with a scaler: it has no bfloat16 hardware, though
    torch.cuda.is_bf16_supported() answers True there (PyTorch emulates it)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert distributed.pick_precision("auto", torch.device("cuda", 0)) == expected


def test_a_precision_the_card_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\) has no bfloat16 hardware"):
        distributed.pick_precision("bf16", torch.device("cuda", 0))
    assert distributed.pick_precision("fp16", torch.device("cuda", 0)) == torch.float16
    assert distributed.pick_precision("fp32", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="--precision"):
        distributed.pick_precision("fp8", torch.device("cpu"))


def test_the_cpu_computes_in_float32_unless_asked():
    cpu = torch.device("cpu")
    assert distributed.pick_precision("auto", cpu) == torch.float32
    assert distributed.pick_precision("fp16", cpu) == torch.float16  # this PyTorch runs float16 autocast on CPUs
    assert distributed.pick_precision("bf16", cpu) == torch.bfloat16


def test_float16_trains_end_to_end_and_the_log_names_it(workspace, monkeypatch, capsys):
    code, stdout, stderr = run_in(workspace / "fp16", tiny_args(workspace, "--out", "run", "--precision", "fp16"),
                                  monkeypatch, capsys)
    assert code == 0, stderr
    assert "computing in float16 (autocast; the weights stay float32; gradients scaled)" in stdout
    document = __import__("json").loads((workspace / "fp16" / "run" / "metrics.json").read_text())
    assert document["precision"] == "float16" and math.isfinite(document["test"]["loss"])


def tiny_linear_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    inputs, labels = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    return model, inputs, labels


def test_float16_skips_an_update_whose_gradients_overflowed_and_lowers_the_scale():
    model, inputs, labels = tiny_linear_setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows float32's gradients
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = train.supervised_loss(model(inputs).float(), labels)
    scaler.scale(loss).backward()
    train.update_weights(optimizer, scaler, train.TrainConfig(lr=0.1), step=0, total_steps=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "the overflowed update is skipped"
    assert scaler.get_scale() < 2.0**127
    scaler = torch.amp.GradScaler("cpu")  # the usual scale, 2**16: the same gradients stay finite
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = train.supervised_loss(model(inputs).float(), labels)
    scaler.scale(loss).backward()
    train.update_weights(optimizer, scaler, train.TrainConfig(lr=0.1), step=1, total_steps=2)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a finite one is taken"


# --------------------------------------------------------------------------- gradient accumulation


def sgd_fine_tune(accumulation_steps: int, batch_size: int, strategy: str, lengths: list[int], seed: int,
                  runtime: distributed.Runtime | None = None, class_weights: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
    """One epoch of plain SGD (which, unlike AdamW, shows a wrongly scaled gradient) through
    train.fine_tune on random texts; the trainable weights it ends with."""
    torch.manual_seed(seed)
    shape = gpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
    model = classify.GPTClassifier(gpt.GPTModel(shape), num_classes=2)
    classify.apply_strategy(model, strategy)
    generator = torch.Generator().manual_seed(seed)
    token_ids = [torch.randint(0, 100, (n,), generator=generator).tolist() for n in lengths]
    dataset = data.ClassificationDataset(token_ids, [i % 2 for i in range(len(lengths))])
    splits = {name: fastpath.SplitInputs(dataset) for name in ("train", "validation", "test")}
    cfg = train.TrainConfig(batch_size=batch_size, accumulation_steps=accumulation_steps, epochs=1)
    job = runner.Job(cfg, runtime or distributed.Runtime(torch.device("cpu")))
    real = train.make_optimizer
    train.make_optimizer = lambda model, cfg: torch.optim.SGD(classify.trainable_parameters(model), lr=0.5)
    try:
        training = train.fine_tune(model, splits, strategy, seed, job, class_weights)
    finally:
        train.make_optimizer = real
    train.restore_state(model, training.best_state)
    return train.trainable_state(model)


@FEW
@given(parts=st.integers(2, 5), batch_size=st.integers(2, 7), seed=st.integers(0, 2**16),
       lengths=st.lists(st.integers(1, 9), min_size=3, max_size=14), strategy=st.sampled_from(["last-block", "all"]))
def test_micro_batches_make_the_update_one_batch_makes(parts, batch_size, seed, lengths, strategy):
    parts = min(parts, batch_size)
    whole = sgd_fine_tune(1, batch_size, strategy, lengths, seed)
    accumulated = sgd_fine_tune(parts, batch_size, strategy, lengths, seed)
    assert whole.keys() == accumulated.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@FEW
@given(parts=st.integers(2, 4), seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 9), min_size=3, max_size=12),
       weights=st.tuples(st.floats(0.1, 5.0), st.floats(0.1, 5.0)))
def test_micro_batches_make_the_update_one_batch_makes_with_class_weights_too(parts, seed, lengths, weights):
    """With --class-weights each part weighs its share of the batch's weight, not of its texts."""
    class_weights = torch.tensor(weights)
    whole = sgd_fine_tune(1, 4, "last-block", lengths, seed, class_weights=class_weights)
    accumulated = sgd_fine_tune(parts, 4, "last-block", lengths, seed, class_weights=class_weights)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@given(indices=st.lists(st.integers(0, 99), max_size=30, unique=True), parts=st.integers(1, 8))
def test_micro_batches_cover_the_batch_once_in_order(indices, parts):
    micro = train.micro_batches(indices, parts)
    assert [i for part in micro for i in part] == indices
    assert 1 <= len(micro) <= max(parts, 1) and (all(micro) or micro == [[]])
    assert max(map(len, micro)) - min(map(len, micro)) <= 1  # 21 texts in 5: 5 4 4 4 4, never 5 5 5 5 1
    assert len(micro) == max(1, min(parts, len(indices)))


# --------------------------------------------------------------------------- schedule, warmup, clipping


@given(step=st.integers(0, 500), total=st.integers(1, 500), warmup=st.integers(0, 50),
       schedule=st.sampled_from(["constant", "linear", "cosine"]), lr=st.floats(1e-6, 1.0))
def test_the_learning_rate_follows_its_formula(step, total, warmup, schedule, lr):
    step = min(step, total - 1)
    cfg = train.TrainConfig(lr=lr, warmup=warmup, schedule=schedule)
    rate = train.learning_rate(step, total, cfg)
    if step < warmup:
        assert rate == pytest.approx(lr * (step + 1) / warmup)
    else:
        t = (step - warmup) / max(total - warmup, 1)
        expected = {"constant": lr, "linear": lr * (1 - t), "cosine": lr * (1 + math.cos(math.pi * t)) / 2}[schedule]
        assert rate == pytest.approx(expected)
    assert 0 <= rate <= lr * (1 + 1e-12)


def test_the_constant_schedule_is_the_books_exact_learning_rate():
    cfg = train.TrainConfig()
    assert all(train.learning_rate(step, 655, cfg) == 5e-5 for step in range(655))


def test_clipping_bounds_the_gradients_norm_before_the_update():
    model, inputs, labels = tiny_linear_setup(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    (10 * train.supervised_loss(model(inputs), labels)).backward()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert norm > 0.5
    train.update_weights(optimizer, scaler, train.TrainConfig(lr=1.0, max_grad_norm=0.5), step=0, total_steps=1)
    moved = torch.linalg.vector_norm(torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), before)])).item()
    assert moved == pytest.approx(0.5, rel=1e-5)  # SGD with lr 1 moves by the clipped gradient


@pytest.mark.parametrize(("extra", "message"), [(["--accumulation-steps", "0"], "--accumulation-steps 0"),
                                                (["--accumulation-steps", "9"], "between 1 and --batch-size (8)"),
                                                (["--warmup", "-1"], "--warmup -1"),
                                                (["--max-grad-norm", "nan"], "--max-grad-norm nan")])
def test_bad_loop_options_stop_before_any_work(extra, message, workspace, monkeypatch, capsys):
    code, stdout, stderr = run_in(workspace / "bad-loop", tiny_args(workspace, "--out", "run", *extra),
                                  monkeypatch, capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and "1. labelled text" not in stdout


def test_a_schedule_with_warmup_and_clipping_trains_and_is_logged(workspace, monkeypatch, capsys):
    args = tiny_args(workspace, "--out", "run", "--schedule", "cosine", "--warmup", "3", "--max-grad-norm", "1",
                     "--accumulation-steps", "2")
    code, stdout, stderr = run_in(workspace / "scheduled", args, monkeypatch, capsys)
    assert code == 0, stderr
    assert "AdamW lr 0.001, 3 warmup updates, cosine decay" in stdout
    assert "batch size 8 in 2 micro-batches, gradient norm clipped at 1" in stdout


# --------------------------------------------------------------------------- memory


@given(blocks=st.integers(0, 48), width=st.sampled_from([64, 768, 1600]), batch=st.integers(1, 64),
       tokens=st.integers(1, 1024))
def test_the_memory_estimate_grows_with_what_training_keeps(blocks, width, batch, tokens):
    def estimate(**change):
        values = dict(parameters=10**8, trainable=10**7, trained_blocks=blocks, emb_dim=width, n_heads=width // 64,
                      micro_batch=batch, tokens=tokens, precision=torch.bfloat16) | change
        return distributed.training_bytes(**values)

    assert estimate() >= (10**8 + 3 * 10**7) * 4  # weights, gradients, AdamW's two moments
    assert estimate(micro_batch=batch + 1) >= estimate() and estimate(trained_blocks=blocks + 1) >= estimate()
    assert estimate(precision=torch.float32) - estimate() == estimate() - (10**8 + 3 * 10**7) * 4


def test_a_run_that_will_not_fit_says_what_would(monkeypatch):
    cfg = train.TrainConfig(batch_size=8)
    job = runner.Job(cfg, distributed.Runtime(torch.device("cpu")), precision=torch.float16)
    shape = gpt.PRESETS["gpt2-medium"]
    parameters = {"total": 355_000_000, "trainable": 355_000_000, "share": 1.0}
    roomy = train.describe_memory(parameters, 24, shape, job, 1024, free_bytes=80 * 2**30)
    assert "free on cpu" in roomy and "NOT fit" not in roomy
    tight = train.describe_memory(parameters, 24, shape, job, 1024, free_bytes=15 * 2**30)
    assert "NOT fit" in tight and "--accumulation-steps" in tight
    parts = int(tight.split("--accumulation-steps ")[1].split()[0])
    fits = train.describe_memory(parameters, 24, shape, runner.Job(train.TrainConfig(batch_size=8, accumulation_steps=parts),
                                 job.runtime, precision=torch.float16), 1024, free_bytes=15 * 2**30)
    assert "NOT fit" not in fits
