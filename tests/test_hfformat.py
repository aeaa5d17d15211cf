"""hfformat.py's claims: an exported classifier is the folder transformers' GPT2ForSequenceClassification
loads (its names, shapes and config) and computes our logits; a folder transformers saved classifies
here with its own head and names; what cannot be expressed is refused in one line, and nothing is left
half-written.

"transformers' computation" is written here by hand from its definition: the rightmost token that is
not pad_token_id, then `score` with no bias. The fixtures made by make_hf_classifier_fixture.py hold
transformers' own logits for tiny classifiers, in both directions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classify
import data
import gpt
import hfformat
import hub
import report
from gpt import GPTConfig, GPTModel
from test_classify import wake_lora_adapters

FIXTURES = Path(__file__).parent / "fixtures"
FEW = settings(max_examples=15, deadline=None)
LABELS = ["negative", "neutral", "positive"]


def tiny_classifier(num_classes=3, emb_dim=8, n_layers=2, n_heads=2, seed=0, vocab_size=50257,
                    pooling="last", qkv_bias=True) -> classify.GPTClassifier:
    torch.manual_seed(seed)
    shape = GPTConfig(vocab_size=vocab_size, context_length=24, emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads,
                      qkv_bias=qkv_bias)
    model = classify.GPTClassifier(GPTModel(shape), num_classes, pooling)
    with torch.no_grad():  # biases off 0 (the head's too) and LayerNorm scales off 1
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def export(model: classify.GPTClassifier, out_dir: Path, label_names=None, max_length=20) -> hfformat.Export:
    names = label_names or [f"class{i}" for i in range(model.num_classes)]
    return hfformat.export_classifier(classify.classifier_tensors(model), model.gpt.cfg, names, model.pooling,
                                      max_length, out_dir)


def transformers_logits_by_hand(folder: Path, token_ids: torch.Tensor) -> torch.Tensor:
    """GPT2ForSequenceClassification's forward, from the folder's files: GPT-2's final hidden states
    (gpt.load_gpt2, tested against transformers' GPT-2 in test_gpt.py), the rightmost token that is
    not pad_token_id (position 0 when there is none), then score.weight with no bias."""
    config = json.loads((folder / "config.json").read_text())
    tensors = gpt.read_safetensors(folder / "model.safetensors")
    with torch.no_grad():
        hidden = gpt.load_gpt2(folder).hidden_states(token_ids)  # (B, T, C)
    not_pad = (token_ids != config["pad_token_id"]).long()  # (B, T)
    position = (torch.arange(token_ids.shape[1]) * not_pad).argmax(dim=-1)  # (B,): rightmost non-pad
    return hidden[torch.arange(len(token_ids)), position] @ tensors["score.weight"].T  # (B, K)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= tol * max(1.0, scale), f"max difference {error:.3g} at scale {scale:.3g}"


def padded_texts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids as classify.predict builds them; a text of length 0 is an empty text,
    which classify.py reads as the single token <|endoftext|>."""
    generator = torch.Generator().manual_seed(seed)
    texts = [torch.randint(0, data.END_OF_TEXT_ID, (n,), generator=generator).tolist() or [data.END_OF_TEXT_ID]
             for n in lengths]
    batch = data.collate([(ids, 0) for ids in texts])
    return batch.token_ids, batch.lengths


# --------------------------------------------------------------------------- out


@FEW
@given(num_classes=st.integers(2, 4), heads=st.integers(1, 2), head_dim=st.sampled_from([4, 8]),
       n_layers=st.integers(1, 2), lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
       seed=st.integers(0, 2**16), qkv_bias=st.booleans())
def test_an_export_computes_our_logits_on_padded_batches(num_classes, heads, head_dim, n_layers, lengths, seed,
                                                         qkv_bias):
    model = tiny_classifier(num_classes, heads * head_dim, n_layers, heads, seed, qkv_bias=qkv_bias)
    token_ids, text_lengths = padded_texts(lengths, seed)
    with tempfile.TemporaryDirectory() as scratch:
        exported = export(model, Path(scratch) / "hf")
        theirs = transformers_logits_by_hand(Path(scratch) / "hf", token_ids)
    with torch.no_grad():
        ours = model(token_ids, text_lengths)
    assert_close_to_scale(theirs, ours)
    assert exported.fold_error < 1e-5


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    infos, metadata, _ = gpt.read_header(path)
    assert metadata == {"format": "pt"}
    return {name: (info.shape, info.dtype) for name, info in infos.items()}


def test_an_export_has_the_names_shapes_and_config_transformers_saves(tmp_path):
    run, config = classify.load_classifier(FIXTURES / "tiny_run")  # the sizes of hf_tiny_classifier
    export(run, tmp_path / "hf", config.label_names, config.max_length)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    ours = tensor_shapes(tmp_path / "hf" / "model.safetensors")
    assert ours == tensor_shapes(FIXTURES / "hf_tiny_classifier" / "model.safetensors")  # transformers' own
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    saved_by_transformers = json.loads((FIXTURES / "hf_tiny_classifier" / "config.json").read_text())
    for key in ("architectures", "model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                "id2label", "label2id", "pad_token_id", "activation_function", "layer_norm_epsilon"):
        assert written[key] == saved_by_transformers[key], key
    assert written["pad_token_id"] == data.END_OF_TEXT_ID
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config.max_length == 24
    assert tokenizer_config["pad_token"] == "<|endoftext|>" and tokenizer_config["padding_side"] == "right"
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (hub.GPT2_BPE_DIR / "encoder.json").read_bytes()
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (hub.GPT2_BPE_DIR / "vocab.bpe").read_bytes()


def test_transformers_computes_our_logits_from_an_export():
    """tiny_run exported and loaded by transformers (the fixture): its logits are classify.py's."""
    reference = gpt.read_safetensors(FIXTURES / "tiny_run_hf_logits.safetensors")
    run, _ = classify.load_classifier(FIXTURES / "tiny_run")
    with torch.no_grad():
        ours = run(reference["token_ids"], reference["lengths"])  # one padded batch
    assert_close_to_scale(ours, reference["logits"])


def test_the_hand_written_reference_is_transformers(tmp_path):
    reference = gpt.read_safetensors(FIXTURES / "tiny_run_hf_logits.safetensors")
    run, config = classify.load_classifier(FIXTURES / "tiny_run")
    export(run, tmp_path / "hf", config.label_names)
    for row, length, want in zip(reference["token_ids"], reference["lengths"].tolist(), reference["logits"]):
        assert_close_to_scale(transformers_logits_by_hand(tmp_path / "hf", row[:length][None])[0], want)


def test_a_lora_run_exports_its_merged_weights(tmp_path):
    model = tiny_classifier(num_classes=2)
    classify.apply_strategy(model, "lora", lora_rank=2)
    wake_lora_adapters(model)  # adapters that change the outputs
    token_ids, lengths = padded_texts([3, 7, 1], seed=4)
    export(model, tmp_path / "hf")
    with torch.no_grad():
        assert_close_to_scale(transformers_logits_by_hand(tmp_path / "hf", token_ids), model(token_ids, lengths))
    assert not any("lora" in name for name in gpt.read_header(tmp_path / "hf" / "model.safetensors")[0])


@pytest.mark.parametrize("pooling", ["mean", "special", "first"])
def test_pooling_other_than_last_is_refused_in_one_line(tmp_path, pooling):
    with pytest.raises(ValueError, match=f"pooling '{pooling}'.*--pooling last") as error:
        export(tiny_classifier(pooling=pooling), tmp_path / "hf")
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()


def test_the_fold_is_exact_when_the_bias_is_in_reach_and_refused_when_not():
    weight = torch.randn(2, 8)
    weight[1] = weight[0]  # two equal rows: W beta' can only move both logits together
    beta = torch.randn(8)
    folded, error = hfformat.fold_head_bias(weight, torch.tensor([0.5, 0.5]), beta)
    assert error < 1e-6 and torch.allclose(weight @ folded, weight @ beta + 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="not independent"):
        hfformat.fold_head_bias(weight, torch.tensor([0.0, 1.0]), beta)
    more_classes_than_width = torch.randn(5, 4)
    with pytest.raises(ValueError, match="cannot be moved"):
        hfformat.fold_head_bias(more_classes_than_width, torch.randn(5), torch.randn(4))


def test_an_existing_folder_is_never_overwritten_and_a_failure_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export(tiny_classifier(), tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]

    def disk_full(file, tensors, metadata=None):
        file.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hfformat, "write_safetensors", disk_full)
    with pytest.raises(ValueError, match="cannot write it.*No space left") as error:
        export(tiny_classifier(), tmp_path / "new" / "hf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "new").exists()  # no folder, no hidden partial one, not even the parent made for it


# --------------------------------------------------------------------------- in


def test_a_classifier_saved_by_transformers_gives_transformers_logits_here():
    reference = gpt.read_safetensors(FIXTURES / "hf_tiny_classifier_logits.safetensors")
    model, config = classify.load_classifier(FIXTURES / "hf_tiny_classifier")
    assert config.label_names == LABELS and config.pooling == "last" and config.max_length == 32
    assert torch.equal(model.head.bias, torch.zeros(3)) and not model.training
    assert model.gpt.lm_head.weight is model.gpt.wte.weight
    with torch.no_grad():
        assert_close_to_scale(model(reference["token_ids"], reference["lengths"]), reference["logits"])


def test_gpt_load_gpt2_reads_the_backbone_of_a_classifier_folder():
    reference = gpt.read_safetensors(FIXTURES / "hf_tiny_classifier_logits.safetensors")
    backbone = gpt.load_gpt2(FIXTURES / "hf_tiny_classifier")
    score = gpt.read_safetensors(FIXTURES / "hf_tiny_classifier" / "model.safetensors")["score.weight"]
    with torch.no_grad():
        hidden = backbone.hidden_states(reference["token_ids"])  # (B, T, C)
    last = hidden[torch.arange(len(hidden)), reference["lengths"] - 1]  # (B, C)
    assert_close_to_scale(last @ score.T, reference["logits"])


def test_export_then_import_keeps_predictions_names_and_max_length(tmp_path):
    model = tiny_classifier(num_classes=3, emb_dim=16)
    classify.save_classifier(model, tmp_path / "run", LABELS, max_length=10)
    run, config = classify.load_classifier(tmp_path / "run")
    export(run, tmp_path / "hf", config.label_names, config.max_length)
    imported, imported_config = classify.load_classifier(tmp_path / "hf")
    assert imported_config.label_names == LABELS and imported_config.max_length == 10
    texts = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok see you later", "", "Hi! " * 40]
    for got, want in zip(classify.predict(imported, imported_config, texts), classify.predict(run, config, texts)):
        assert got.label == want.label
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)


def a_copy_of(folder: Path, tmp_path: Path, edit_config=None) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    if edit_config is not None:
        config = json.loads((copy / "config.json").read_text())
        edit_config(config)
        (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(pad_token_id=13), "pad_token_id 13 is a token"),
    (lambda c: c.update(id2label={"0": "a", "1": "b"}), "must name each of the 3 classes"),
    (lambda c: c.update(id2label={"0": "a", "1": "a", "2": "b"}), "must name each of the 3 classes"),
    (lambda c: c.update(n_embd=32), "shape"),
    (lambda c: c.update(activation_function="relu"), "activation_function"),
])
def test_a_malformed_transformers_folder_is_one_clear_error(tmp_path, edit, message):
    folder = a_copy_of(FIXTURES / "hf_tiny_classifier", tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        classify.load_classifier(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pad_token_id", [None, 50257])  # none (batches of one), or a token added for padding
def test_names_default_to_transformers_and_a_pad_token_never_in_a_text_is_accepted(tmp_path, pad_token_id):
    def without_names(config):
        del config["id2label"], config["label2id"]
        config["pad_token_id"] = pad_token_id

    _, config = classify.load_classifier(a_copy_of(FIXTURES / "hf_tiny_classifier", tmp_path, without_names))
    assert config.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_a_language_model_folder_has_no_head_to_classify_with(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel without a classification head.*train.py --model"):
        classify.load_classifier(FIXTURES / "hf_tiny")


# --------------------------------------------------------------------------- the command line


def test_the_command_exports_then_classifies_with_the_export(tmp_path, capsys):
    classify.save_classifier(tiny_classifier(num_classes=2), tmp_path / "run", ["ham", "spam"], max_length=20)
    assert report.classify_command(classify, ["--model", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf")]) == 0
    assert "GPT2ForSequenceClassification with 2 labels (ham, spam)" in capsys.readouterr().out
    assert report.classify_command(classify, ["--model", str(tmp_path / "hf"), "--device", "cpu", "Win a prize", "Lunch?"]) == 0
    from_export = capsys.readouterr().out
    assert report.classify_command(classify, ["--model", str(tmp_path / "run"), "--device", "cpu", "Win a prize", "Lunch?"]) == 0
    assert from_export == capsys.readouterr().out  # same labels, same probabilities to 3 decimals


@pytest.mark.parametrize("case", ["mean pooling", "existing folder", "vocabulary", "no head", "missing"])
def test_command_errors_are_one_line_and_exit_code_2(tmp_path, capsys, case):
    classify.save_classifier(tiny_classifier(pooling="mean"), tmp_path / "mean", LABELS, max_length=20)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    argv = {"mean pooling": ["--model", str(tmp_path / "mean"), "--export-hf", str(tmp_path / "out")],
            "existing folder": ["--model", str(FIXTURES / "tiny_run"), "--export-hf", str(tmp_path / "taken")],
            "vocabulary": ["--model", str(FIXTURES / "hf_tiny_classifier"), "--device", "cpu", "hello"],
            "no head": ["--model", str(FIXTURES / "hf_tiny"), "--device", "cpu", "hello"],
            "missing": ["--model", str(tmp_path / "nowhere"), "--export-hf", str(tmp_path / "out")]}[case]
    assert report.classify_command(classify, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("classify.py: error:")
    assert not (tmp_path / "out").exists()
