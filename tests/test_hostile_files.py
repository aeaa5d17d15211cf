"""Hostile files around gpt.py and hfformat.py, treated as classes: every small JSON file they read
(config.json, tokenizer_config.json, model.safetensors.index.json) and every weights file may be a
named pipe, a link to /dev/zero, a folder, a dangling link, huge, not UTF-8 or not JSON; each gives
one short ValueError naming it, never a hang, a MemoryError or a traceback. Also: sharded weights
load like the single file, id2label of any shape, non-finite heads, damaged BPE files at export, a
classifier folder given where a GPT-2 is expected, and what gpt.py's command prints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classify
import gpt
import hfformat
import hub
import report
import train
from conftest import REPO, offline_env

FIXTURES = REPO / "tests" / "fixtures"
SOME = settings(max_examples=40, deadline=None)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="POSIX only")


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with hub.atomic_open(path) as file:
        hfformat.write_safetensors(file, tensors, metadata)


@contextlib.contextmanager
def never_hangs(seconds: int = 30):
    """Turns a hang into a failure: SIGALRM interrupts an open or read that waits forever."""
    def give_up(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: a named pipe or an endless file was waited on")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_short_line(error: BaseException, *names: str, longest: int = 2000) -> None:
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message[:300]}"
    assert "\n" not in message and len(message) < longest, message[:300]
    for name in names:
        assert name in message, message


# --------------------------------------------------------------------------- special files, every place


SPECIAL_KINDS = ["named pipe", "link to a named pipe", "link to /dev/zero", "folder", "dangling link", "huge",
                 "empty", "not UTF-8", "not JSON", "nested 100000 deep", "unreadable"]


def make_hostile(path: Path, kind: str) -> None:
    """Replace `path` (a file or nothing) with a hostile thing of the given kind."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "named pipe":
        os.mkfifo(path)
    elif kind == "link to a named pipe":
        os.mkfifo(path.with_name(path.name + ".pipe"))
        path.symlink_to(path.name + ".pipe")
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(path.name + ".gone")
    elif kind == "huge":  # sparse: a file of 16 MiB and one byte of zeros costs no disk
        with open(path, "wb") as file:
            file.truncate(gpt.MAX_JSON_BYTES + 1)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not UTF-8":
        path.write_bytes(b'{"n_embd": "\xff\xfe"}')
    elif kind == "not JSON":
        path.write_text("{'n_embd': 64,}")
    elif kind == "nested 100000 deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text("{}")
        path.chmod(0)


def hf_folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "hf_tiny", tmp_path / "hf"))


def sharded_folder(tmp_path: Path) -> Path:
    folder = hf_folder(tmp_path)
    tensors = gpt.read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    write_shards(folder, tensors, [i % 2 for i in range(len(tensors))])
    return folder


def transformers_classifier(tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(FIXTURES / "hf_tiny_classifier", tmp_path / "cls"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return folder


def run_folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "tiny_run", tmp_path / "run"))


PLACES = {  # where the hostile file sits -> (make the folder, its file's name, the call that reads it)
    "GPT-2 config.json": (hf_folder, "config.json", gpt.load_config),
    "GPT-2 model.safetensors": (hf_folder, "model.safetensors", lambda folder: gpt.load_gpt2(folder)),
    "index of shards": (sharded_folder, "model.safetensors.index.json", lambda folder: gpt.load_gpt2(folder)),
    "a shard": (sharded_folder, "model-00002-of-00002.safetensors", lambda folder: gpt.load_gpt2(folder)),
    "transformers classifier config.json": (transformers_classifier, "config.json", classify.load_classifier),
    "transformers classifier tokenizer_config.json": (transformers_classifier, "tokenizer_config.json",
                                                      classify.load_classifier),
    "transformers classifier model.safetensors": (transformers_classifier, "model.safetensors",
                                                  classify.load_classifier),
    "train.py run config.json": (run_folder, "config.json", classify.load_classifier),
}


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("place", PLACES)
def test_any_hostile_file_anywhere_is_one_line_naming_it_never_a_hang(tmp_path, place, kind):
    make_folder, name, read = PLACES[place]
    folder = make_folder(tmp_path)
    make_hostile(folder / name, kind)
    with never_hangs(), pytest.raises(Exception) as raised:
        read(folder)
    assert_one_short_line(raised.value, name)


def test_the_reader_of_small_json_files_reads_a_link_to_a_regular_file(tmp_path):
    (tmp_path / "real.json").write_text('{"a": [1, 2.5, null]}')
    (tmp_path / "link.json").symlink_to("real.json")
    assert gpt.read_json(tmp_path / "link.json") == {"a": [1, 2.5, None]}


@SOME
@given(content=st.binary(max_size=64) | JSON_VALUES.map(lambda value: json.dumps(value).encode()))
def test_any_bytes_as_a_small_json_file_give_their_value_or_one_value_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("json") / "config.json"
    path.write_bytes(content)
    try:
        value = gpt.read_json(path)
    except ValueError as error:
        assert_one_short_line(error, "config.json")
        with pytest.raises((ValueError, RecursionError)):
            json.loads(content.decode("utf-8"))
        return
    assert json.dumps(value) == json.dumps(json.loads(content.decode("utf-8")))


# --------------------------------------------------------------------------- sharded weights


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], shard_of: list[int]) -> dict[str, str]:
    """tensors split as save_pretrained splits a large model: model-0000i-of-0000n.safetensors and
    model.safetensors.index.json; shard_of[i] is the shard of the i-th tensor."""
    count = max(shard_of) + 1
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {name: files[shard] for name, shard in zip(tensors, shard_of)}
    for file in files:
        save(folder / file, {name: tensors[name] for name in tensors if weight_map[name] == file}, {"format": "pt"})
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_sharded_checkpoint_loads_the_same_weights_as_the_single_file(tmp_path_factory, data):
    single = gpt.load_gpt2(FIXTURES / "hf_tiny")
    tensors = gpt.read_safetensors(FIXTURES / "hf_tiny" / "model.safetensors")
    count = data.draw(st.integers(1, 4), label="shards")
    shard_of = data.draw(st.lists(st.integers(0, count - 1), min_size=len(tensors), max_size=len(tensors)))
    shard_of = [sorted(set(shard_of)).index(shard) for shard in shard_of]  # no empty shard in between
    folder = tmp_path_factory.mktemp("sharded")
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", folder / "config.json")
    write_shards(folder, tensors, shard_of)
    sharded = gpt.load_gpt2(folder)
    assert sharded.state_dict().keys() == single.state_dict().keys()
    for name, tensor in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name
    assert sharded.lm_head.weight is sharded.wte.weight


def test_a_sharded_transformers_classifier_classifies_as_the_single_file(tmp_path):
    folder = Path(shutil.copytree(FIXTURES / "hf_tiny_classifier", tmp_path / "cls"))
    tensors = gpt.read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    write_shards(folder, tensors, [int(name == "score.weight") for name in tensors])  # the head alone in shard 2
    reference = gpt.read_safetensors(FIXTURES / "hf_tiny_classifier_logits.safetensors")
    model, config = classify.load_classifier(folder)
    single, _ = classify.load_classifier(FIXTURES / "hf_tiny_classifier")
    assert config.label_names == ["negative", "neutral", "positive"]
    with torch.no_grad():
        torch.testing.assert_close(model(reference["token_ids"], reference["lengths"]),
                                   single(reference["token_ids"], reference["lengths"]), rtol=0, atol=0)


INDEX_DAMAGE = {
    "a shard outside the folder": (lambda m: {name: "../model-00001-of-00002.safetensors" for name in m},
                                   "weight_map"),
    "an absolute shard path": (lambda m: {name: "/etc/passwd" for name in m}, "weight_map"),
    "a shard that is not .safetensors": (lambda m: {name: "config.json" for name in m}, "weight_map"),
    "a tensor listed in the wrong shard": (lambda m: {**m, "transformer.wte.weight": "model-00002-of-00002.safetensors"
                                                      if m["transformer.wte.weight"].startswith("model-00001")
                                                      else "model-00001-of-00002.safetensors"},
                                           "is not listed for this shard"),
    "a tensor listed that no shard holds": (lambda m: {**m, "transformer.h.9.ln_1.weight": m["transformer.wte.weight"]},
                                            "h.9.ln_1.weight"),
    "a shard missing": (lambda m: {name: shard.replace("00002-of-00002", "00003-of-00003") for name, shard in m.items()},
                        "model-00003-of-00003.safetensors"),
    "no weight_map": (lambda m: None, "weight_map"),
}


@pytest.mark.parametrize("damage", INDEX_DAMAGE)
def test_a_damaged_index_of_shards_is_one_line(tmp_path, damage):
    folder = sharded_folder(tmp_path)
    edit, message = INDEX_DAMAGE[damage]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = edit(index["weight_map"])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as raised:
        gpt.load_gpt2(folder)
    assert_one_short_line(raised.value, message)


@SOME
@given(index=JSON_VALUES | st.fixed_dictionaries({"weight_map": JSON_VALUES}))
def test_any_json_as_an_index_of_shards_is_one_value_error(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("index")
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", folder / "config.json")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as raised:  # no shard exists, so nothing can load
        gpt.load_gpt2(folder)
    assert_one_short_line(raised.value)


# --------------------------------------------------------------------------- what a transformers folder holds


def edited_classifier(tmp_path: Path, **changes) -> Path:
    folder = Path(shutil.copytree(FIXTURES / "hf_tiny_classifier", tmp_path / "cls"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@SOME
@given(id2label=JSON_VALUES | st.lists(st.text(max_size=3), max_size=4).map(lambda names: dict(enumerate(names))))
def test_any_id2label_gives_the_names_or_one_short_line(tmp_path_factory, id2label):
    id2label = json.loads(json.dumps(id2label))  # as the file holds it: keys are strings
    folder = edited_classifier(tmp_path_factory.mktemp("id2label"), id2label=id2label)
    try:
        _, config = classify.load_classifier(folder)
    except ValueError as error:
        assert_one_short_line(error, "config.json")
        return
    names = [f"LABEL_{i}" for i in range(3)] if id2label is None else [id2label[str(i)] for i in range(3)]
    assert config.label_names == names


@pytest.mark.parametrize("id2label", [5, 2.0, True, "abc", ["a", "b", "c"], {"0": 1, "1": 2, "2": 3}])
def test_id2label_shapes_that_once_were_a_type_error_are_one_line(tmp_path, id2label):
    with pytest.raises(ValueError) as raised:
        classify.load_classifier(edited_classifier(tmp_path, id2label=id2label))
    assert_one_short_line(raised.value, "id2label")


def test_an_error_about_a_huge_id2label_quotes_200_characters_of_it(tmp_path):
    """10^5 labels (2 MB of config.json) for a 3-class head: the line quotes a cut, not all of it."""
    huge = {str(i): f"label{i}" for i in range(100_000)}
    with pytest.raises(ValueError) as raised:
        classify.load_classifier(edited_classifier(tmp_path, id2label=huge))
    assert_one_short_line(raised.value, "id2label", "…", longest=600)


def test_a_config_json_too_large_to_be_one_is_refused_unread(tmp_path):
    """10^6 labels: 25 MB, beyond what any config.json holds."""
    huge = {str(i): f"label{i}" for i in range(1_000_000)}
    with pytest.raises(ValueError) as raised:
        classify.load_classifier(edited_classifier(tmp_path, id2label=huge))
    assert_one_short_line(raised.value, "config.json", "larger than")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_head_that_is_not_finite_is_refused(tmp_path, value):
    """Once: every text classified `ham`, probabilities nan, exit code 0."""
    folder = Path(shutil.copytree(FIXTURES / "hf_tiny_classifier", tmp_path / "cls"))
    tensors = gpt.read_safetensors(folder / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"].clone()
    tensors["score.weight"][1, 3] = value
    save(folder / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(ValueError) as raised:
        classify.load_classifier(folder)
    assert_one_short_line(raised.value, "score.weight", "NaN or infinity")


@SOME
@given(key=st.sampled_from(["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "n_inner", "format",
                            "activation_function", "layer_norm_epsilon", "scale_attn_weights", "pad_token_id",
                            "architectures"]),
       value=JSON_VALUES | st.text(min_size=300, max_size=400))
def test_any_value_in_a_transformers_config_classifies_or_is_one_short_line(tmp_path_factory, key, value):
    folder = edited_classifier(tmp_path_factory.mktemp("field"), **{key: value})
    try:
        model, config = classify.load_classifier(folder)
    except ValueError as error:
        assert_one_short_line(error, longest=1200)
        return
    assert isinstance(model, classify.GPTClassifier) and config.num_classes == 3


@pytest.mark.parametrize("sizes", [{"emb_dim": 2**40, "n_heads": 1}, {"vocab_size": 2**62}, {"context_length": 2**59}])
def test_a_config_too_large_for_any_memory_is_a_value_error_not_a_torch_error(tmp_path, sizes):
    with pytest.raises(ValueError, match="larger than any memory"):
        gpt.GPTConfig(**sizes)
    run = run_folder(tmp_path)
    fields = json.loads((run / "config.json").read_text())
    fields["gpt"].update(sizes)
    (run / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError) as raised:
        classify.load_classifier(run)
    assert_one_short_line(raised.value, "larger than any memory")


def test_config_errors_quote_a_cut_of_what_they_were_given():
    with pytest.raises(ValueError) as raised:
        gpt.GPTConfig(drop_rate="x" * 10**6)
    assert_one_short_line(raised.value, "drop_rate", "…", longest=600)


# --------------------------------------------------------------------------- a classifier where a GPT-2 belongs


def test_a_classifier_saved_by_train_py_is_named_as_such_with_what_to_run(tmp_path, capsys):
    run = run_folder(tmp_path)
    for load in (gpt.load_config, gpt.load_gpt2):
        with pytest.raises(ValueError) as raised:
            load(run)
        assert_one_short_line(raised.value, "a classifier saved by train.py", f"python classify.py --model {run}",
                              "--export-hf", "python train.py --model")
    assert hub.generate_command(gpt, ["--model", str(run), "Hello"]) == 2
    assert "a classifier saved by train.py" in capsys.readouterr().err
    code = train.main(["--data", str(tmp_path / "texts.csv"), "--model", str(run), "--device", "cpu",
                       "--out", str(tmp_path / "out")])  # refused before the data is read
    err = capsys.readouterr().err
    assert code == 2 and "a classifier saved by train.py" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- export with damaged BPE files


BPE_DAMAGE = {
    "missing folder": lambda folder: shutil.rmtree(folder),
    "vocab.bpe cut short": lambda folder: (folder / "vocab.bpe").write_bytes((folder / "vocab.bpe").read_bytes()[:-10]),
    "encoder.json missing": lambda folder: (folder / "encoder.json").unlink(),
    "encoder.json a named pipe": lambda folder: make_hostile(folder / "encoder.json", "named pipe"),
    "vocab.bpe a link to /dev/zero": lambda folder: make_hostile(folder / "vocab.bpe", "link to /dev/zero"),
}


@pytest.mark.parametrize("damage", BPE_DAMAGE)
def test_an_export_without_gpt2s_tokenizer_files_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys, damage):
    bpe = Path(shutil.copytree(hub.GPT2_BPE_DIR, tmp_path / "gpt2_bpe"))
    BPE_DAMAGE[damage](bpe)
    monkeypatch.setattr(hub, "GPT2_BPE_DIR", bpe)
    run = run_folder(tmp_path)
    with never_hangs():
        assert report.classify_command(classify, ["--model", str(run), "--export-hf", str(tmp_path / "out" / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer files" in err and "gpt2_bpe" in err
    assert not (tmp_path / "out").exists()  # nothing written, not even the parent


# --------------------------------------------------------------------------- the gpt.py command


def tiny_gpt2_folder(folder: Path) -> Path:
    """A random GPT-2 with the real vocabulary, small enough to generate with in a test."""
    cfg = gpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=8, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    tensors = {name: param.detach().t() if gpt.HF_CONV1D_WEIGHTS.fullmatch(name) else param.detach()
               for name, param in gpt.GPTModel(cfg).named_parameters() if name != "lm_head.weight"}
    folder.mkdir(parents=True)
    save(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 16,
                                                    "n_embd": 8, "n_layer": 1, "n_head": 2}))
    return folder


def gpt_py(*arguments: str, tmp_path: Path, **run) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "gpt.py"), *arguments], env=offline_env(tmp_path / "env"),
                          timeout=120, **run)


def test_gpt_py_continues_a_prompt_and_escapes_the_names_it_prints(tmp_path):
    folder = tiny_gpt2_folder(tmp_path / "model \x1b[2J\u202e")
    result = gpt_py("--model", str(folder), "--max-new-tokens", "3", "Every effort moves", tmp_path=tmp_path,
                    capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Every effort moves") and result.stdout.count(b"\n") >= 1
    assert b"\x1b" not in result.stderr and "\u202e".encode() not in result.stderr
    assert b"\\x1b[2J" in result.stderr and b"Traceback" not in result.stderr


def test_gpt_py_errors_escape_the_names_they_quote(tmp_path, capsys):
    assert hub.generate_command(gpt, ["--model", str(tmp_path / "no\x1b]0;pwned\x07where"), "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;pwned\\x07" in err


def test_gpt_py_into_a_closed_pipe_exits_quietly(tmp_path):
    """`python gpt.py ... | head -1` where head is already gone: no BrokenPipeError traceback."""
    folder = tiny_gpt2_folder(tmp_path / "model")
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        result = gpt_py("--model", str(folder), "--max-new-tokens", "2", "Hello", tmp_path=tmp_path,
                        stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr and b"Errno" not in result.stderr


def test_ctrl_c_in_gpt_py_is_exit_code_130_and_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt, "load_gpt2", interrupted)
    assert hub.generate_command(gpt, ["--model", str(tiny_gpt2_folder(tmp_path / "model")), "Hello"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("interrupted\n") and "Traceback" not in captured.err


# --------------------------------------------------------------------------- hub.py's own small files


@pytest.mark.parametrize("kind", ["named pipe", "link to /dev/zero", "folder"])
def test_a_hostile_refs_main_in_the_hugging_face_cache_is_passed_over(tmp_path, kind):
    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (refs := tmp_path / "models--openai-community--gpt2" / "refs").mkdir()
    make_hostile(refs / "main", kind)  # was read whole: a pipe waited forever, /dev/zero filled memory
    with never_hangs():
        assert hub.find_in_hf_cache("gpt2-small", tmp_path) == snapshot / "model.safetensors"
