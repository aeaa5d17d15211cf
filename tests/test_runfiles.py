"""Run folders hold what training changed: from starting weights that can be found again (a preset
or a local weights folder or file), only the trained parameters beside the starting weights'
identity (their sha256, checked when loading); `--save full` and runs from random weights are
whole. classify.py and --export-hf load both kinds the same; a missing or different base is one
clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import classify
import gpt
import hfformat
import hub
import report
import runfiles
from test_train import base_run, run_in, tiny_args, workspace  # noqa: F401 (fixtures)

TEXTS = ["WINNER!! Claim your free prize now", "see you at lunch?", "", "ok " * 40]


@pytest.fixture(scope="module")
def base_weights(workspace, base_run) -> Path:
    """A GPT-2 that can be found again: the tests' tiny run, exported as a transformers folder."""
    folder = workspace / "base-weights"
    assert report.classify_command(classify, ["--model", str(base_run[0]), "--export-hf", str(folder)]) == 0
    return folder


def train_from(base: Path, workspace: Path, name: str, monkeypatch, capsys, *extra: str) -> Path:
    args = tiny_args(workspace, "--out", "run", "--model", str(base), "--init", "pretrained", "--epochs", "1", *extra)
    code, _, stderr = run_in(workspace / name, args, monkeypatch, capsys)
    assert code == 0, stderr
    return workspace / name / "run"


def probabilities(run: Path) -> torch.Tensor:
    model, config = classify.load_classifier(run)
    return torch.tensor([list(p.probabilities.values()) for p in classify.predict(model, config, TEXTS)])


@pytest.mark.parametrize("strategy", ["head", "last-block", "lora", "gradual"])
def test_a_run_holds_what_trained_and_loads_as_the_whole_run_does(strategy, base_weights, workspace, monkeypatch,
                                                                   capsys):
    trained = train_from(base_weights, workspace, f"trained-{strategy}", monkeypatch, capsys, "--strategy", strategy)
    whole = train_from(base_weights, workspace, f"whole-{strategy}", monkeypatch, capsys, "--strategy", strategy,
                       "--save", "full")
    config = json.loads((trained / "config.json").read_text())
    assert config["base"] == {"source": str(base_weights), "sha256": runfiles.files_sha256(base_weights)}
    assert "base" not in json.loads((whole / "config.json").read_text())
    saved = set(gpt.read_header(trained / "classifier.safetensors")[0])
    assert "head.weight" in saved and not any(name.startswith(("gpt.wte", "gpt.wpe")) for name in saved)
    assert (trained / "classifier.safetensors").stat().st_size < 0.5 * (whole / "classifier.safetensors").stat().st_size
    if strategy == "lora":
        assert config["lora"] == {"rank": 8, "alpha": 16.0} and any(".lora_A" in name for name in saved)
    torch.testing.assert_close(probabilities(trained), probabilities(whole), rtol=1e-5, atol=1e-6)


def test_runs_from_random_weights_and_all_are_whole(base_weights, workspace, monkeypatch, capsys, base_run):
    assert "base" not in json.loads((base_run[0] / "config.json").read_text())  # --init random
    everything = train_from(base_weights, workspace, "trained-all", monkeypatch, capsys, "--strategy", "all")
    assert "base" not in json.loads((everything / "config.json").read_text())


def test_an_export_of_a_trained_only_run_is_a_whole_transformers_folder(base_weights, workspace, monkeypatch, capsys):
    trained = train_from(base_weights, workspace, "to-export", monkeypatch, capsys, "--strategy", "lora")
    exported = workspace / "exported-trained-only"
    assert report.classify_command(classify, ["--model", str(trained), "--export-hf", str(exported)]) == 0
    torch.testing.assert_close(probabilities(exported), probabilities(trained), rtol=1e-4, atol=1e-5)


def test_a_missing_or_different_base_is_one_line_naming_it(base_weights, workspace, monkeypatch, capsys):
    moved = workspace / "movable-base"
    shutil.copytree(base_weights, moved)
    trained = train_from(moved, workspace, "trained-moved", monkeypatch, capsys, "--strategy", "head")
    tensors = gpt.read_safetensors(moved / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"] + 1e-3  # other weights, same shapes
    with hub.atomic_open(moved / "model.safetensors") as file:
        hfformat.write_safetensors(file, tensors)
    with pytest.raises(ValueError, match=r"not those this run was trained from \(sha256"):
        classify.load_classifier(trained)
    shutil.rmtree(moved)
    with pytest.raises(ValueError, match=f"{moved}.*cannot be read.*--save full") as error:
        classify.load_classifier(trained)
    assert "\n" not in str(error.value)
    assert report.classify_command(classify, ["--model", str(trained), "hello"]) == 2
    assert "starting weights" in capsys.readouterr().err


def test_nan_in_a_saved_run_is_refused_not_classified(base_run, tmp_path):
    run = tmp_path / "nan-run"
    shutil.copytree(base_run[0], run)
    tensors = gpt.read_safetensors(run / "classifier.safetensors")
    tensors["gpt.h.0.ln_1.weight"] = torch.full_like(tensors["gpt.h.0.ln_1.weight"], float("nan"))
    with hub.atomic_open(run / "classifier.safetensors") as file:
        hfformat.write_safetensors(file, tensors)
    with pytest.raises(ValueError, match="NaN or infinity"):
        classify.load_classifier(run)


def test_a_transformers_folder_that_keeps_the_end_of_long_texts_is_read_so(base_weights, tmp_path):
    """tokenizer_config.json's truncation_side "left": transformers keeps a long text's end, and so
    must classify.py (it once kept the start: 79 of 200 labels differed at model_max_length 5)."""
    folder = tmp_path / "keeps-the-end"
    shutil.copytree(base_weights, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "truncation_side": "left",
                                                              "model_max_length": 5}))
    model, config = classify.load_classifier(folder)
    assert (config.truncation_side, config.max_length) == ("left", 5)
    text = "Lunch at one? Then the cinema, and WINNER!! claim your prize"
    tokenizer = classify.data.get_tokenizer()
    assert classify.prepare_tokens(tokenizer, text, 5, "left") == classify.data.encode(tokenizer, text)[-5:]
    ending = tokenizer.decode(classify.data.encode(tokenizer, text)[-5:])
    [whole, end] = classify.predict(model, config, [text, ending])
    assert whole.probabilities == pytest.approx(end.probabilities, abs=1e-6)
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "truncation_side": "middle"}))
    with pytest.raises(ValueError, match="truncation_side 'middle'"):
        classify.load_classifier(folder)
