"""Hostile and careless input: every case is refused with one clear line (exit code 2 from the
commands, ValueError from the library), stays bounded in time and memory, and never leaves a
half-written file or throws a finished run away. Download faults are in test_hub.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classify
import data
import gpt
import hub
import report
import train
from test_classify import tiny_classifier
from test_train import TINY_GPT, run_in, tiny_args, workspace  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
SOME = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- untrusted files


@SOME
@given(header=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4), payload=st.binary(max_size=64))
def test_any_header_gives_tensors_or_a_value_error(tmp_path_factory, header, payload):
    path = tmp_path_factory.mktemp("st") / "any.safetensors"
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + payload)
    try:
        tensors = gpt.read_safetensors(path)
    except ValueError:
        return
    assert all(isinstance(tensor, torch.Tensor) for tensor in tensors.values())


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},  # was a TypeError
    {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]},  # an empty tensor torch cannot shape
    {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]},
])
def test_headers_that_once_crashed_the_reader_are_value_errors(tmp_path, entry):
    encoded = json.dumps({"a": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"\0" * entry["data_offsets"][1])
    with pytest.raises(ValueError, match="bad.safetensors"):
        gpt.read_safetensors(path)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hostile-run")
    classify.save_classifier(tiny_classifier(n_layers=2), run_dir, ["ham", "spam"], max_length=20)
    return run_dir


def field_paths() -> list[tuple[str, ...]]:
    top = ["format", "format_version", "gpt", "num_classes", "label_names", "pooling", "max_length", "tokenizer"]
    return [(key,) for key in top] + [("gpt", key) for key in gpt.GPTConfig.__dataclass_fields__]


@SOME
@given(where=st.sampled_from(field_paths()), value=JSON_VALUES)
def test_any_json_value_in_any_config_field_loads_or_is_one_value_error(saved_run, tmp_path_factory, where, value):
    run_dir = tmp_path_factory.mktemp("edited")
    (run_dir / "classifier.safetensors").write_bytes((saved_run / "classifier.safetensors").read_bytes())
    fields = json.loads((saved_run / "config.json").read_text())
    target = fields
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (run_dir / "config.json").write_text(json.dumps(fields))
    try:
        model, config = classify.load_classifier(run_dir)
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(model, classify.GPTClassifier) and config.num_classes == 2


@pytest.mark.parametrize("edit", [
    lambda fields: fields["gpt"].update(n_layers=10**9),  # built before the file was checked: forever
    lambda fields: fields.update(max_length=True),  # JSON true silently became 1 token
    lambda fields: fields.update(max_length=float("inf")),  # 1e999 in the file
    lambda fields: fields["gpt"].update(drop_rate="0.5"),
])
def test_config_edits_that_once_misbehaved_are_refused(saved_run, tmp_path, edit):
    (tmp_path / "classifier.safetensors").write_bytes((saved_run / "classifier.safetensors").read_bytes())
    fields = json.loads((saved_run / "config.json").read_text())
    edit(fields)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError):
        classify.load_classifier(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_weights_file_that_is_a_pipe_is_refused_not_waited_on(saved_run, tmp_path):
    (tmp_path / "config.json").write_bytes((saved_run / "config.json").read_bytes())
    os.mkfifo(tmp_path / "classifier.safetensors")  # opening it for reading would wait for a writer forever
    with pytest.raises(ValueError, match="classifier.safetensors"):
        classify.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        gpt.read_safetensors(tmp_path / "classifier.safetensors")


def test_a_run_whose_vocabulary_is_smaller_than_the_tokenizer_cannot_predict(tmp_path):
    """It loads (a tiny test model may), but classifying would index past its embedding: refused."""
    model = classify.GPTClassifier(gpt.GPTModel(gpt.GPTConfig(vocab_size=1000, context_length=16, emb_dim=8,
                                                              n_layers=1, n_heads=2)), 2)
    classify.save_classifier(model, tmp_path, ["ham", "spam"], max_length=16)
    loaded, config = classify.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="1000 tokens"):
        classify.predict(loaded, config, ["hello"])


def test_a_config_nested_100000_deep_is_one_value_error(saved_run, tmp_path):
    (tmp_path / "classifier.safetensors").write_bytes((saved_run / "classifier.safetensors").read_bytes())
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="config.json"):
        classify.load_classifier(tmp_path)


@SOME
@given(key=st.sampled_from(["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "n_inner",
                            "activation_function", "layer_norm_epsilon", "scale_attn_weights"]), value=JSON_VALUES)
def test_any_value_in_a_hugging_face_config_gives_a_config_or_a_value_error(tmp_path_factory, key, value):
    folder = tmp_path_factory.mktemp("hf")
    fields = json.loads((FIXTURES / "hf_tiny" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**fields, key: value}))
    try:
        assert isinstance(gpt.load_config(folder), gpt.GPTConfig)
    except ValueError as error:
        assert "\n" not in str(error) and len(str(error)) < 1000  # what it quotes is cut


def test_a_csv_field_beyond_the_csv_modules_limit_is_one_line(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "short,a\n" + "x" * 200_000 + ",b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"long\.csv, line 3: field larger than field limit"):
        data.read_labelled(path)


# --------------------------------------------------------------------------- the main job


HOSTILE_FLAGS = {
    "lora alpha nan": (["--strategy", "lora", "--lora-alpha", "nan"], "--lora-alpha nan"),  # once: all-NaN model, exit 0
    "lr nan": (["--lr", "nan"], "--lr nan"),
    "lr inf": (["--lr", "inf"], "--lr inf"),
    "weight decay nan": (["--weight-decay", "nan"], "--weight-decay nan"),
    "device meta": (["--device", "meta"], "--device meta"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "--seed"),  # was torch's "Overflow when unpacking long"
    "a strategy compared with itself": (["--compare", "head,head"], "listed twice"),  # one folder, two runs
}


@pytest.mark.parametrize("case", list(HOSTILE_FLAGS))
def test_bad_numbers_and_devices_stop_before_any_work(case, workspace, monkeypatch, capsys):  # noqa: F811
    extra, message = HOSTILE_FLAGS[case]
    code, stdout, stderr = run_in(workspace / "hostile-flags", tiny_args(workspace, "--out", "run", *extra),
                                  monkeypatch, capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1
    assert "1. labelled text" not in stdout and not (workspace / "hostile-flags" / "run").exists()


def test_a_model_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(workspace, monkeypatch, capsys):  # noqa: F811
    small = workspace / "small-vocab"
    small.mkdir(exist_ok=True)
    (small / "config.json").write_text(json.dumps({**TINY_GPT, "vocab_size": 1000}))
    args = tiny_args(workspace, "--out", "run")
    args[args.index("--model") + 1] = str(small)
    code, _, stderr = run_in(workspace / "small-vocab-run", args, monkeypatch, capsys)
    assert code == 2 and "1000 tokens" in stderr


def test_a_random_model_too_large_for_memory_is_refused_before_it_is_built(workspace, monkeypatch, capsys):  # noqa: F811
    huge = workspace / "huge"
    huge.mkdir(exist_ok=True)
    (huge / "config.json").write_text(json.dumps({**TINY_GPT, "n_layer": 10**9}))  # building it never ended
    args = tiny_args(workspace, "--out", "run")
    args[args.index("--model") + 1] = str(huge)
    code, _, stderr = run_in(workspace / "huge-run", args, monkeypatch, capsys)
    assert code == 2 and "more than this machine's" in stderr


def test_a_diverging_run_stops_and_saves_nothing(workspace, monkeypatch, capsys):  # noqa: F811
    real_loss = train.supervised_loss
    monkeypatch.setattr(train, "supervised_loss", lambda *args: real_loss(*args) * float("nan"))
    code, _, stderr = run_in(workspace / "diverging", tiny_args(workspace, "--out", "run"), monkeypatch, capsys)
    assert code == 2 and "diverged" in stderr and stderr.count("\n") == 1
    assert list((workspace / "diverging").iterdir()) == []


def test_out_as_a_link_to_an_empty_folder_receives_the_run(workspace, monkeypatch, capsys):  # noqa: F811
    folder = workspace / "linked"
    (folder / "target").mkdir(parents=True)
    (folder / "link").symlink_to(folder / "target")
    code, _, stderr = run_in(folder, tiny_args(workspace, "--out", "link"), monkeypatch, capsys)
    assert code == 0, stderr
    assert {"classifier.safetensors", "config.json", "metrics.json"} <= {p.name for p in (folder / "target").iterdir()}
    assert (folder / "link").is_symlink()


def test_an_out_folder_filled_during_training_keeps_the_finished_run(workspace, monkeypatch, capsys):  # noqa: F811
    folder = workspace / "raced"
    real_loss = train.supervised_loss

    def loss_while_another_run_writes_there(*args):
        (folder / "run").mkdir(parents=True, exist_ok=True)
        (folder / "run" / "theirs.txt").write_text("another run")
        return real_loss(*args)

    monkeypatch.setattr(train, "supervised_loss", loss_while_another_run_writes_there)
    code, _, stderr = run_in(folder, tiny_args(workspace, "--out", "run"), monkeypatch, capsys)
    assert code == 2 and "the finished work is in" in stderr
    kept = Path(stderr.rsplit("the finished work is in ", 1)[1].strip())
    model, config = classify.load_classifier(kept)
    assert config.label_names == ["ham", "spam"] and (kept / "metrics.json").is_file()
    assert sorted(p.name for p in (folder / "run").iterdir()) == ["theirs.txt"]


def test_sigterm_cleans_up_like_ctrl_c(workspace, tmp_path):  # noqa: F811
    """`kill` (docker stop, a scheduler) during training leaves no hidden .partial folder and no
    parent folders made for the run."""
    program = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import train
real_loss, calls = train.supervised_loss, []
def loss(*args):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_loss(*args)
train.supervised_loss = loss
sys.exit(train.main({tiny_args(workspace, "--out", "nested/run")!r}))
"""
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "no run folder was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the classify.py command


def run_classify(arguments: list[str], stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "classify.py"), *arguments], input=stdin, capture_output=True,
                          timeout=120, env=environment)


def test_invalid_utf8_on_stdin_is_refused_like_a_file(saved_run):
    result = run_classify(["--model", str(saved_run), "--file", "-"], stdin=b"fine\n\xff\xfe broken\n")
    assert result.returncode == 2 and result.stdout == b"" and b"utf-8" in result.stderr.lower()


def test_control_characters_never_reach_the_terminal(saved_run):
    text = "free prize \x1b[2J\x1b]0;pwned\x07 \x9b31m \u202eevil"
    table = run_classify(["--model", str(saved_run), text])
    assert table.returncode == 0
    assert not any(byte in table.stdout for byte in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()))
    assert b"\\x1b[2J" in table.stdout
    as_json = run_classify(["--model", str(saved_run), "--json", text])
    assert b"\x1b" not in as_json.stdout and "\x9b".encode() not in as_json.stdout
    assert json.loads(as_json.stdout)[0]["text"] == text  # escaped for the terminal, the same text for a program


def test_an_ascii_only_terminal_gets_escapes_not_a_crash(saved_run):
    result = run_classify(["--model", str(saved_run), "ok 😀"], env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and b"\\U0001f600" in result.stdout


def test_an_endless_file_is_refused_within_its_bound(saved_run, monkeypatch, capsys):
    monkeypatch.setattr(report, "MAX_INPUT_BYTES", 2**20)
    assert report.classify_command(classify, ["--model", str(saved_run), "--file", "/dev/zero"]) == 2
    assert "classify it in parts" in capsys.readouterr().err


# --------------------------------------------------------------------------- the gpt.py command


def test_a_nan_temperature_is_one_line(capsys):
    assert hub.generate_command(gpt, ["--model", str(FIXTURES / "hf_tiny"), "--top-k", "5", "--temperature", "nan",
                                 "Hello"]) == 2
    err = capsys.readouterr().err
    assert "temperature nan" in err and err.count("\n") == 1  # before any weight is loaded


def test_generation_never_picks_a_token_the_tokenizer_cannot_decode():
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=60, context_length=8, emb_dim=8, n_layers=1, n_heads=2)).eval()
    with torch.no_grad():
        model.wte.weight[50:] += 100.0  # the tokens past the limit are by far the likeliest
    output = hub.generate(model, torch.zeros(2, 1, dtype=torch.long), 6, vocab_limit=50)
    assert output.max() < 50
