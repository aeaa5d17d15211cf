"""classify.py: the chapter's claims about the classifier, its representations, its fine-tuning
strategies, save/load, predict and the command line, on tiny random GPTs."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import classify
import data
import report
from classify import GPTClassifier
from gpt import GPTConfig, GPTModel
from hfformat import write_safetensors
from hub import atomic_open

PAD = data.PAD_TOKEN_ID
VOCAB = 50257  # the real vocabulary, so the real pad id and tokenizer work; emb_dim stays tiny
STRATEGY_NAMES = ["head", "last-block", "last-2-blocks", "all", "gradual", "lora"]
FEW = settings(max_examples=20, deadline=None)


def tiny_gpt(emb_dim=16, n_layers=3, n_heads=2, context_length=32, drop_rate=0.0, seed=0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(context_length=context_length, emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads, drop_rate=drop_rate)
    return GPTModel(cfg)


def tiny_classifier(pooling="last", num_classes=2, seed=0, **cfg) -> GPTClassifier:
    model = GPTClassifier(tiny_gpt(seed=seed, **cfg), num_classes, pooling)
    with torch.no_grad():  # GPT-2's zero-initialised biases and unit LayerNorms would hide bugs
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def wake_lora_adapters(model, std: float = 1.0, seed: int | None = None) -> None:
    """LoRA's B starts at zero, so fresh adapters change nothing: give them something to say."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, classify.LoRALinear):
                module.lora_B.normal_(std=std, generator=generator)


def random_token_lists(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def padded(token_lists: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = data.collate([(ids, 0) for ids in token_lists], pad_to=width)
    return batch.token_ids, batch.lengths


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, name: str = "") -> None:
    """Equal up to float32 rounding, measured against the tensor's own scale (a gradient's small
    entries inherit the rounding error of its large ones)."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= tol * max(1.0, scale), f"{name}: max difference {error:.3g} at scale {scale:.3g}"


def intended_trainable(name: str, strategy: str, n_layers: int, epoch: int = 0) -> bool:
    """What each strategy should train, written from the chapter's description, independently of
    classify.py's code."""
    if strategy == "all":
        return True
    if name.startswith("head."):
        return True
    if ".lora_" in name:
        return strategy == "lora"
    if name.startswith("gpt.ln_f."):
        return strategy != "head"
    block = re.match(r"gpt\.h\.(\d+)\.", name)
    if block:
        top = {"head": 0, "last-block": 1, "last-2-blocks": 2, "gradual": min(epoch, n_layers), "lora": 0}[strategy]
        return int(block.group(1)) >= n_layers - top
    return False  # token and position embeddings


configs = st.builds(
    lambda heads, head_dim, layers: dict(emb_dim=heads * head_dim, n_heads=heads, n_layers=layers, context_length=24),
    st.integers(1, 3),
    st.sampled_from([4, 8]),  # LayerNorm over 2 numbers is degenerate: (x - mean) / std is always +-1
    st.integers(1, 3),
)
batch_lengths = st.lists(st.integers(1, 12), min_size=1, max_size=5)
seeds = st.integers(0, 2**16)


# --------------------------------------------------------------------------- the classifier


@FEW
@given(cfg=configs, lengths=batch_lengths, seed=seeds, pooling=st.sampled_from(classify.POOLINGS),
       strategy=st.sampled_from(STRATEGY_NAMES[:3] + STRATEGY_NAMES[3:]), num_classes=st.integers(2, 4))
def test_logits_have_one_row_per_text_and_one_column_per_class(cfg, lengths, seed, pooling, strategy, num_classes):
    if strategy == "last-2-blocks" and cfg["n_layers"] < 2:
        strategy = "last-block"
    model = tiny_classifier(pooling, num_classes, seed, **cfg)
    classify.apply_strategy(model, strategy, epoch=1)
    logits = model(*padded(random_token_lists(lengths, seed)))
    assert logits.shape == (len(lengths), num_classes)
    assert torch.isfinite(logits).all()


def plain_logits(model: GPTClassifier, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The chapter's composition, written out in full: every block at every position, the final
    LayerNorm, the text's vector, the head. forward must give exactly this, with less work."""
    if model.pooling == "special":
        token_ids, lengths = classify.append_special_token(token_ids, lengths)
    return model.head(classify.pool(model.gpt.hidden_states(token_ids), lengths, model.pooling))  # (B, K)


def logits_and_gradients(compute, model, labels):
    model.zero_grad()
    logits = compute()
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@FEW
@given(cfg=configs, lengths=batch_lengths, extra=st.integers(0, 6), seed=seeds, pooling=st.sampled_from(classify.POOLINGS),
       strategy=st.sampled_from(["head", "last-block", "all", "lora"]), sdpa=st.booleans())
def test_forward_gives_the_plain_compositions_logits_and_gradients(cfg, lengths, extra, seed, pooling, strategy, sdpa):
    """The final block at the last position only ("last", "special") and position 0 alone
    ("first") skip work nothing reads: the same logits and gradients as every block at every
    position, across model shapes, both attention kernels, padding, strategies and LoRA."""
    model = tiny_classifier(pooling, seed=seed, **cfg)
    model.gpt.set_fast_attention(sdpa)
    classify.apply_strategy(model, strategy, lora_rank=2)
    wake_lora_adapters(model, std=0.1, seed=seed)  # a no-op unless strategy is lora
    token_ids, lens = padded(random_token_lists(lengths, seed), width=max(lengths) + extra)
    labels = torch.arange(len(lengths)) % 2
    ours = logits_and_gradients(lambda: model(token_ids, lens), model, labels)
    plain = logits_and_gradients(lambda: plain_logits(model, token_ids, lens), model, labels)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-5)
    assert ours[1].keys() == plain[1].keys()
    for name in plain[1]:
        assert_close_to_scale(ours[1][name], plain[1][name], name=name)


@pytest.mark.parametrize("pooling", classify.POOLINGS)
def test_an_empty_batch_gives_no_logits_and_zero_gradients(pooling):
    """A torchrun process whose share of a batch is empty still runs a step (distributed.py
    weighs its gradient by 0): no logits, and every trainable parameter a zero gradient, none
    left out of the exchange."""
    model = tiny_classifier(pooling)
    classify.apply_strategy(model, "all")
    logits = model(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert logits.shape == (0, 2)
    F.cross_entropy(logits, torch.zeros(0, dtype=torch.long)).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_vocabulary_head_is_never_computed():
    model = tiny_classifier()
    model.gpt.lm_head.register_forward_hook(lambda *_: pytest.fail("lm_head ran"))
    model(*padded(random_token_lists([5, 3], seed=0)))


@FEW
@given(lengths=batch_lengths, extra=st.integers(1, 6), seed=seeds, pooling=st.sampled_from(classify.POOLINGS))
def test_appending_pad_tokens_never_changes_the_logits(lengths, extra, seed, pooling):
    model = tiny_classifier(pooling, seed=seed)
    token_lists = random_token_lists(lengths, seed)
    token_ids, lens = padded(token_lists)
    more_padding, _ = padded(token_lists, width=token_ids.shape[1] + extra)
    torch.testing.assert_close(model(more_padding, lens), model(token_ids, lens), rtol=1e-5, atol=1e-5)


@FEW
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=5), seed=seeds, pooling=st.sampled_from(classify.POOLINGS))
def test_a_text_gets_the_same_logits_alone_or_in_a_batch(lengths, seed, pooling):
    model = tiny_classifier(pooling, seed=seed)
    token_lists = random_token_lists(lengths, seed)
    together = model(*padded(token_lists))
    alone = torch.cat([model(*padded([ids])) for ids in token_lists])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_first_pooling_reads_only_the_first_token():
    model = tiny_classifier("first")
    token_ids, lengths = padded(random_token_lists([6, 4], seed=1))
    changed = token_ids.clone()
    changed[:, 1:] = (changed[:, 1:] + 1) % VOCAB
    torch.testing.assert_close(model(changed, lengths), model(token_ids, lengths), rtol=0, atol=0)


def test_last_pooling_reads_the_last_real_token():
    model = tiny_classifier("last")
    token_ids, lengths = padded(random_token_lists([6], seed=2))
    changed = token_ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB
    assert not torch.allclose(model(changed, lengths), model(token_ids, lengths))


@FEW
@given(lengths=batch_lengths, seed=seeds)
def test_special_pooling_reads_an_endoftext_appended_to_each_text(lengths, seed):
    """"usar tokens especiais": the logits are those of "last" pooling over text + <|endoftext|>,
    although <|endoftext|> is also the pad token: lengths, not token values, say where a text ends."""
    special = tiny_classifier("special", seed=seed)
    last = GPTClassifier(special.gpt, 2, "last")
    last.head = special.head
    token_lists = random_token_lists(lengths, seed)
    with_token = [ids + [data.END_OF_TEXT_ID] for ids in token_lists]
    torch.testing.assert_close(special(*padded(token_lists)), last(*padded(with_token)), rtol=1e-5, atol=1e-5)
    assert data.END_OF_TEXT_ID == PAD  # the case the test is about: the special token is the pad token


def test_special_pooling_still_reads_the_whole_text():
    model = tiny_classifier("special")
    token_ids, lengths = padded(random_token_lists([6, 3], seed=2))
    changed = token_ids.clone()
    changed[1, 2] = (changed[1, 2] + 1) % VOCAB  # the last real token of the shorter text
    logits, changed_logits = model(token_ids, lengths), model(changed, lengths)
    assert torch.equal(logits[0], changed_logits[0]) and not torch.allclose(logits[1], changed_logits[1])


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="last, mean, special, first"):
        GPTClassifier(tiny_gpt(), 2, pooling="max")


# --------------------------------------------------------------------------- strategies


def test_strategy_names():
    one, also_one = classify.parse_strategy("last-block"), classify.parse_strategy("last-1-blocks")
    assert (one.kind, one.num_blocks) == (also_one.kind, also_one.num_blocks) == ("last-blocks", 1)
    assert classify.parse_strategy("last-3-blocks").num_blocks == 3
    for bad in ["last-0-blocks", "last-x-blocks", "everything", "Head", ""]:
        with pytest.raises(ValueError, match="head, last-block, last-N-blocks, all, gradual, lora"):
            classify.parse_strategy(bad)


def test_last_n_blocks_beyond_the_models_depth_is_a_clear_error():
    model = tiny_classifier(n_layers=3)
    classify.apply_strategy(model, "last-3-blocks")
    with pytest.raises(ValueError, match=r"only 3 blocks; choose N in 1\.\.3"):
        classify.apply_strategy(model, "last-4-blocks")


CASES = [(s, 0) for s in STRATEGY_NAMES if s != "gradual"] + [("gradual", e) for e in range(5)]


@pytest.mark.parametrize("pooling", classify.POOLINGS)
@pytest.mark.parametrize(("strategy", "epoch"), CASES)
def test_only_the_intended_parameters_get_gradients_and_move(strategy, epoch, pooling):
    model = tiny_classifier(pooling, n_layers=3)
    classify.apply_strategy(model, strategy, epoch=epoch)
    names = dict(model.named_parameters())
    intended = {name for name in names if intended_trainable(name, strategy, 3, epoch)}
    assert {name for name, p in names.items() if p.requires_grad} == intended
    assert {id(p) for p in classify.trainable_parameters(model)} == {id(names[n]) for n in intended}
    trainable, total = report.parameter_counts(model)["trainable"], report.parameter_counts(model)["total"]
    assert trainable == sum(names[n].numel() for n in intended) and total == sum(p.numel() for p in names.values())

    token_ids, lengths = padded(random_token_lists([7, 3, 5], seed=3))
    F.cross_entropy(model(token_ids, lengths), torch.tensor([0, 1, 1])).backward()
    with_gradient = {name for name, p in names.items() if p.grad is not None and p.grad.abs().sum() > 0}
    if strategy == "lora":  # B starts at zero, so A's first gradient (through B) is exactly zero
        assert with_gradient == {n for n in intended if not n.endswith("lora_A")}
    else:
        assert with_gradient == intended

    before = {name: p.detach().clone() for name, p in names.items()}
    torch.optim.AdamW(classify.trainable_parameters(model), lr=1e-2, weight_decay=0.1).step()
    changed = {name for name, p in names.items() if not torch.equal(p, before[name])}
    assert changed == intended  # frozen parameters are bit-identical


def test_gradual_unfreezes_one_more_block_per_epoch_from_the_top():
    model = tiny_classifier(n_layers=4)
    for epoch in range(7):
        classify.apply_strategy(model, "gradual", epoch=epoch)
        training = [i for i, block in enumerate(model.gpt.h) if any(p.requires_grad for p in block.parameters())]
        assert training == list(range(4 - min(epoch, 4), 4))
        assert model.gpt.ln_f.weight.requires_grad and not model.gpt.wte.weight.requires_grad
        assert model.gpt.h[0].ln_1.weight.requires_grad == (epoch >= 4)


# --------------------------------------------------------------------------- LoRA


def test_lora_at_initialisation_equals_the_base_model():
    model = tiny_classifier()
    token_ids, lengths = padded(random_token_lists([9, 4, 1], seed=4))
    base = model(token_ids, lengths)
    classify.apply_strategy(model, "lora", lora_rank=4, lora_alpha=8)
    assert sum(isinstance(m, classify.LoRALinear) for m in model.modules()) == 4 * 3
    assert torch.equal(model(token_ids, lengths), base)


def test_lora_trains_rank_r_adapters_and_merged_weights_give_the_same_outputs():
    rank, emb_dim, n_layers = 4, 16, 3
    model = tiny_classifier(emb_dim=emb_dim, n_layers=n_layers)
    classify.apply_strategy(model, "lora", lora_rank=rank, lora_alpha=8)
    adapters = n_layers * rank * ((emb_dim + 3 * emb_dim) + (emb_dim + emb_dim) + (emb_dim + 4 * emb_dim) + (4 * emb_dim + emb_dim))
    assert report.parameter_counts(model)["trainable"] == adapters + (emb_dim * 2 + 2) + 2 * emb_dim  # + head + ln_f
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}

    token_ids, lengths = padded(random_token_lists([9, 4, 6, 2], seed=5))
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW(classify.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(token_ids, lengths), labels).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in pretrained and not name.startswith(("head.", "gpt.ln_f.")):
            assert torch.equal(p, pretrained[name]), f"{name}: a frozen pretrained weight moved"
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, classify.LoRALinear))

    plain = GPTClassifier(tiny_gpt(emb_dim=emb_dim, n_layers=n_layers), 2)
    missing, unexpected = plain.load_state_dict(classify.classifier_tensors(model), strict=False)
    assert missing == ["gpt.lm_head.weight"] and unexpected == []  # lm_head is tied to wte, which loaded
    torch.testing.assert_close(plain(token_ids, lengths), model(token_ids, lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("strategy", "epoch", "words"), [
    ("head", 0, "head"), ("last-block", 0, "head + final LayerNorm + block 2"),
    ("last-2-blocks", 0, "head + final LayerNorm + blocks 1-2"), ("all", 0, "head + final LayerNorm + blocks 0-2 + embeddings"),
    ("gradual", 0, "head + final LayerNorm"), ("gradual", 2, "head + final LayerNorm + blocks 1-2"),
    ("lora", 0, "head + final LayerNorm + LoRA adapters in blocks 0-2"),  # once "blocks 0-2": adapters only train
])
def test_what_trains_is_said_in_words(strategy, epoch, words):
    model = tiny_classifier(n_layers=3)
    classify.apply_strategy(model, strategy, epoch=epoch)
    assert report.describe_trainable(model) == words


def test_another_strategy_on_a_lora_model_is_refused():
    model = tiny_classifier()
    classify.apply_strategy(model, "lora")
    classify.apply_strategy(model, "lora")  # again: keeps the adapters
    with pytest.raises(ValueError, match="LoRA adapters"):
        classify.apply_strategy(model, "last-block")


# --------------------------------------------------------------------------- save, load, predict

TEXTS = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok see you later", "", "Hi! " * 40]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    model = tiny_classifier(emb_dim=16, n_layers=2, context_length=32)
    run_dir = tmp_path_factory.mktemp("run")
    classify.save_classifier(model, run_dir, ["ham", "spam"], max_length=20)
    return model, run_dir


def test_save_then_load_gives_identical_predictions(saved_run):
    model, run_dir = saved_run
    loaded, config = classify.load_classifier(run_dir)
    assert config.label_names == ["ham", "spam"] and config.max_length == 20 and config.gpt == model.gpt.cfg
    assert sorted(p.name for p in run_dir.iterdir()) == ["classifier.safetensors", "config.json"]  # no temp files
    assert not loaded.training
    assert loaded.gpt.lm_head.weight is loaded.gpt.wte.weight
    assert predict_all(loaded, config) == predict_all(model, config)


def predict_all(model, config, **kwargs):
    return [(p.label, p.probabilities) for p in classify.predict(model, config, TEXTS, **kwargs)]


def test_a_saved_lora_run_loads_as_a_plain_classifier(tmp_path):
    model = tiny_classifier(n_layers=2)
    classify.apply_strategy(model, "lora", lora_rank=2)
    wake_lora_adapters(model)
    classify.save_classifier(model, tmp_path, ["ham", "spam"], max_length=20)
    loaded, config = classify.load_classifier(tmp_path)
    assert not any(isinstance(m, classify.LoRALinear) for m in loaded.modules())
    for (label, got), (want_label, want) in zip(predict_all(loaded, config), predict_all(model, config)):
        assert label == want_label and got == pytest.approx(want, abs=1e-5)


def test_saving_over_a_run_replaces_it(saved_run, tmp_path):
    model, _ = saved_run
    classify.save_classifier(tiny_classifier(n_layers=1), tmp_path, ["a", "b"], max_length=None)
    classify.save_classifier(model, tmp_path, ["ham", "spam"], max_length=20)
    loaded, config = classify.load_classifier(tmp_path)
    assert config.label_names == ["ham", "spam"] and len(loaded.gpt.h) == 2


def test_save_rejects_label_names_that_do_not_match_the_head(tmp_path):
    with pytest.raises(ValueError, match="3 label names"):
        classify.save_classifier(tiny_classifier(), tmp_path, ["a", "b", "c"], max_length=10)


def damage(run_dir, how):
    config_path, weights_path = run_dir / "config.json", run_dir / "classifier.safetensors"
    if how == "no config":
        config_path.unlink()
    elif how == "no weights":
        weights_path.unlink()
    elif how == "corrupt json":
        config_path.write_text('{"format": "gpt2-classifier", ')
    elif how == "not a classifier config":
        config_path.write_text(json.dumps({"n_embd": 768}))
    elif how == "wider model in config":
        fields = json.loads(config_path.read_text())
        fields["gpt"]["emb_dim"] = 32
        config_path.write_text(json.dumps(fields))
    elif how == "deeper model in config":
        fields = json.loads(config_path.read_text())
        fields["gpt"]["n_layers"] = 3
        config_path.write_text(json.dumps(fields))
    elif how == "three labels":
        fields = json.loads(config_path.read_text())
        fields["label_names"], fields["num_classes"] = ["a", "b", "c"], 3
        config_path.write_text(json.dumps(fields))
    elif how == "duplicate labels":  # predict's {name: probability} would lose a class
        fields = json.loads(config_path.read_text())
        fields["label_names"] = ["ham", "ham"]
        config_path.write_text(json.dumps(fields))
    elif how == "zero heads in config":  # was a ZeroDivisionError
        fields = json.loads(config_path.read_text())
        fields["gpt"]["n_heads"] = 0
        config_path.write_text(json.dumps(fields))
    elif how == "truncated weights":
        weights_path.write_bytes(weights_path.read_bytes()[:1000])
    elif how == "a tensor missing":
        with atomic_open(weights_path) as file:
            write_safetensors(file, {"head.weight": torch.zeros(2, 16)})


DAMAGES = ["no config", "no weights", "corrupt json", "not a classifier config", "wider model in config",
           "deeper model in config", "three labels", "duplicate labels", "zero heads in config", "truncated weights",
           "a tensor missing"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_or_mismatched_run_raises_one_clear_value_error(saved_run, tmp_path, how):
    model, _ = saved_run
    classify.save_classifier(model, tmp_path, ["ham", "spam"], max_length=20)
    damage(tmp_path, how)
    with pytest.raises(ValueError) as error:
        classify.load_classifier(tmp_path)
    assert "\n" not in str(error.value)


def test_a_missing_run_folder_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        classify.load_classifier(tmp_path / "nowhere")


def test_predict_keeps_the_input_order_and_matches_one_by_one(saved_run):
    model, run_dir = saved_run
    _, config = classify.load_classifier(run_dir)
    texts = TEXTS + ["short", "a somewhat longer message than the others here"]
    together = classify.predict(model, config, texts, batch_size=3)
    assert [p.text for p in together] == texts
    for p in together:
        (alone,) = classify.predict(model, config, [p.text])
        assert alone.label == p.label and alone.probabilities == pytest.approx(p.probabilities, abs=1e-5)
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
        assert p.label == max(p.probabilities, key=p.probabilities.get)


def test_empty_and_too_long_texts_have_defined_predictions(saved_run):
    model, run_dir = saved_run
    _, config = classify.load_classifier(run_dir)
    tokenizer = data.get_tokenizer()
    assert classify.prepare_tokens(tokenizer, "", config.max_length) == [PAD]
    long_text = "Hi! " * 40
    ids = data.encode(tokenizer, long_text)
    assert len(ids) > config.max_length and classify.prepare_tokens(tokenizer, long_text, 20) == ids[:20]
    prefix = tokenizer.decode(ids[:20])
    assert data.encode(tokenizer, prefix) == ids[:20]
    (long_prediction, prefix_prediction, empty) = classify.predict(model, config, [long_text, prefix, ""])
    assert long_prediction.probabilities == pytest.approx(prefix_prediction.probabilities, abs=1e-6)
    assert empty.label in ("ham", "spam")


def test_predict_restores_training_mode(saved_run):
    model, run_dir = saved_run
    _, config = classify.load_classifier(run_dir)
    model.train()
    classify.predict(model, config, ["hello"])
    assert model.training
    assert classify.predict(model, config, []) == []


# --------------------------------------------------------------------------- the command line


def test_cli_prints_a_label_and_probabilities_per_text(saved_run, capsys):
    _, run_dir = saved_run
    assert report.classify_command(classify, ["--model", str(run_dir), "WINNER!! claim your prize", "see you at 8"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(re.fullmatch(r"(ham|spam)\tham=\d\.\d{3} spam=\d\.\d{3}\t.*", line) for line in lines)
    assert lines[0].endswith("WINNER!! claim your prize") and "messages/s" in err


def test_cli_json_output(saved_run, capsys):
    model, run_dir = saved_run
    assert report.classify_command(classify, ["--model", str(run_dir), "--json", *TEXTS]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [item["text"] for item in output] == TEXTS
    _, config = classify.load_classifier(run_dir)
    for item, (label, probabilities) in zip(output, predict_all(model, config)):
        assert item["label"] == label and item["probabilities"] == pytest.approx(probabilities)


def test_cli_reads_one_text_per_line_from_a_file_or_stdin(saved_run, tmp_path, capsys, monkeypatch):
    _, run_dir = saved_run
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("first message\r\n\nthird message\n", encoding="utf-8")
    assert report.classify_command(classify, ["--model", str(run_dir), "--json", "--file", str(texts_file)]) == 0
    assert [item["text"] for item in json.loads(capsys.readouterr().out)] == ["first message", "", "third message"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\nand another"), encoding="utf-8"))
    assert report.classify_command(classify, ["--model", str(run_dir), "--json", "--file", "-"]) == 0
    assert [item["text"] for item in json.loads(capsys.readouterr().out)] == ["from stdin", "and another"]


@pytest.mark.parametrize(
    "arguments",
    [
        ["--model", "{missing}", "text"],
        ["--model", "{empty}", "text"],
        ["--model", "{run}", "--file", "{missing}"],
        ["--model", "{run}"],
        ["--model", "{run}", "--batch-size", "0", "text"],
        ["--model", "{run}", "--batch-size", "1000000", "text"],
        ["--model", "{run}", "--export-hf", "{out}", "text"],
        ["--model", "{run}", "--export-hf", "{out}", "--json"],
        ["--model", "{run}", "--export-hf", ""],
        ["--model", "{run_file}", "text"],
    ],
    ids=["missing run", "not a run", "missing file", "no text", "bad batch size", "huge batch size",
         "export with texts", "export as json", "export nowhere", "a file, not a run"],
)
def test_cli_errors_are_one_line_and_exit_code_2(saved_run, tmp_path, capsys, arguments):
    _, run_dir = saved_run
    places = {"missing": tmp_path / "nowhere", "empty": tmp_path, "run": run_dir, "out": tmp_path / "hf",
              "run_file": run_dir / "config.json"}
    argv = [argument.format(**places) for argument in arguments]
    assert report.classify_command(classify, argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("classify.py: error: ")
    assert not (tmp_path / "hf").exists()


def test_many_classes_show_the_ten_most_likely(tmp_path, capsys):
    """A model of many classes costs what the ten most likely cost per text, not its class count."""
    names = [f"class {k}" for k in range(40)]
    model = tiny_classifier(num_classes=len(names), emb_dim=16, n_layers=1)
    classify.save_classifier(model, tmp_path / "many", names, max_length=16)
    loaded, config = classify.load_classifier(tmp_path / "many")
    full = classify.predict(loaded, config, ["a text", "another one"])
    top = classify.predict(loaded, config, ["a text", "another one"], top=3)
    for whole, best in zip(full, top):
        ranked = sorted(whole.probabilities.items(), key=lambda item: -item[1])[:3]
        assert list(best.probabilities) == [name for name, _ in ranked] and best.label == ranked[0][0]
        assert list(best.probabilities.values()) == pytest.approx([value for _, value in ranked])
    assert report.classify_command(classify, ["--model", str(tmp_path / "many"), "--json", "a text"]) == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert len(shown["probabilities"]) == 10 and shown["label"] == full[0].label


def test_sigterm_stops_classify_like_ctrl_c_and_a_closed_pipe_quietly(saved_run, tmp_path):
    _, run_dir = saved_run
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore:Failed to initialize NumPy"}
    command = [sys.executable, str(Path(classify.__file__)), "--model", str(run_dir)]
    fifo = tmp_path / "texts.fifo"
    os.mkfifo(fifo)
    waiting = subprocess.Popen([*command, "--file", str(fifo)], stderr=subprocess.PIPE, text=True, env=quiet)
    with open(fifo, "w"):  # opens once classify.py opened it to read: its SIGTERM handler is in place by then
        waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=60) == 130 and "interrupted" in waiting.stderr.read()
    texts = tmp_path / "texts.txt"
    texts.write_text("hello there\n" * 5000)
    reader = subprocess.Popen([*command, "--file", str(texts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=quiet)
    assert reader.stdout.readline()
    reader.stdout.close()  # as `| head -1` does
    assert reader.wait(timeout=120) == 1 and "Traceback" not in reader.stderr.read()


def test_cli_help_documents_empty_and_long_texts(capsys):
    assert report.classify_command(classify, ["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "empty text" in help_text and "max_length" in help_text


def test_running_the_script_classifies_and_exits_2_on_a_missing_run(saved_run, tmp_path):
    _, run_dir = saved_run
    script = Path(classify.__file__)
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore:Failed to initialize NumPy"}  # torch's warning without numpy

    def run(*argv):
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=quiet)

    ok = run("--model", str(run_dir), "hello")
    assert ok.returncode == 0 and re.match(r"(ham|spam)\t", ok.stdout)
    missing = run("--model", str(tmp_path / "x"), "hello")
    assert missing.returncode == 2 and missing.stdout == "" and len(missing.stderr.splitlines()) == 1
