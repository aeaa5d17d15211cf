"""The claims gpt.py makes: the model's shape and causality, its two attention paths agreeing,
safetensors files read and written exactly (and damaged ones refused), Hugging Face GPT-2
weights loading to the same logits as transformers (one file or shards), and generation."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt
import hfformat
import hub
from gpt import GPTConfig, GPTModel

FIXTURES = Path(__file__).parent / "fixtures"
FAST = settings(max_examples=20, deadline=None)


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written whole, as the project's callers write one."""
    with hub.atomic_open(path) as file:
        hfformat.write_safetensors(file, tensors, metadata)


# --------------------------------------------------------------------------- the model


@st.composite
def tiny_configs(draw: st.DrawFn) -> GPTConfig:
    n_heads = draw(st.integers(1, 3))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 40)),
        context_length=draw(st.integers(1, 12)),
        emb_dim=n_heads * draw(st.integers(1, 6)),
        n_layers=draw(st.integers(0, 2)),
        n_heads=n_heads,
        qkv_bias=draw(st.booleans()),
    )


@st.composite
def model_and_tokens(draw: st.DrawFn) -> tuple[GPTModel, torch.Tensor]:
    cfg = draw(tiny_configs())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = GPTModel(cfg).eval()
    batch, num_tokens = draw(st.integers(1, 3)), draw(st.integers(1, cfg.context_length))
    return model, torch.randint(0, cfg.vocab_size, (batch, num_tokens))


@FAST
@given(model_and_tokens())
def test_logits_and_hidden_states_have_one_row_per_token(case):
    model, token_ids = case
    batch, num_tokens = token_ids.shape
    assert model(token_ids).shape == (batch, num_tokens, model.cfg.vocab_size)
    assert model.hidden_states(token_ids).shape == (batch, num_tokens, model.cfg.emb_dim)


@FAST
@given(model_and_tokens(), st.data())
def test_changing_later_tokens_never_changes_earlier_logits(case, data):
    model, token_ids = case
    t = data.draw(st.integers(0, token_ids.shape[1] - 1), label="t")
    changed = token_ids.clone()
    changed[:, t + 1 :] = torch.randint(0, model.cfg.vocab_size, changed[:, t + 1 :].shape)
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, : t + 1], model(token_ids)[:, : t + 1])


@FAST
@given(model_and_tokens())
def test_explicit_attention_equals_the_fused_kernel(case):
    model, token_ids = case
    with torch.no_grad():
        model.set_fast_attention(True)
        fast = model(token_ids)
        model.set_fast_attention(False)
        explicit = model(token_ids)
    assert all(not block.attn.use_sdpa for block in model.h)
    torch.testing.assert_close(explicit, fast, rtol=1e-5, atol=1e-5)


@FAST
@given(model_and_tokens())
def test_forward_is_the_tied_head_applied_to_the_hidden_states(case):
    model, token_ids = case
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        expected = model.hidden_states(token_ids) @ model.wte.weight.T  # (B, T, V)
        torch.testing.assert_close(model(token_ids), expected)


def test_more_tokens_than_the_context_is_an_error():
    model = GPTModel(GPTConfig(vocab_size=10, context_length=4, emb_dim=4, n_layers=1, n_heads=1))
    with pytest.raises(ValueError, match="context length 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("sizes", [{"n_heads": 0}, {"emb_dim": -4, "n_heads": 2}, {"n_layers": -1}])
def test_a_config_with_impossible_sizes_is_a_value_error(sizes):
    # n_heads 0 used to escape as ZeroDivisionError (a traceback from classify.py on a bad config.json).
    with pytest.raises(ValueError, match="must be integers >= 1"):
        GPTConfig(**{"vocab_size": 10, "context_length": 4, "emb_dim": 4, "n_layers": 1, "n_heads": 1, **sizes})


# --------------------------------------------------------------------------- safetensors


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(
        max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=generator, dtype=torch.int64
    ).to(dtype)


tensor_dicts = st.dictionaries(
    keys=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8).filter(
        lambda name: name != "__metadata__"
    ),
    values=st.tuples(
        st.sampled_from(list(gpt.SAFETENSORS_DTYPES.values())),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is a 0-d tensor; a 0 makes it empty
        st.integers(0, 2**16),
    ).map(lambda spec: random_tensor(*spec)),
    max_size=6,
)
metadata_dicts = st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


@settings(max_examples=50, deadline=None)
@given(tensor_dicts, metadata_dicts)
def test_safetensors_round_trip_every_dtype_and_shape(tmp_path_factory, tensors, metadata):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save(path, tensors, metadata)
    assert_same_tensors(gpt.read_safetensors(path), tensors)
    assert gpt.read_header(path)[1] == (metadata or {})
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_size % 8 == 0  # padded like the official library's files
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_tensors_sharing_storage_are_each_written(tmp_path):
    weight = torch.randn(5, 3)
    tensors = {"wte.weight": weight, "lm_head.weight": weight, "transposed": weight.t(), "row": weight[2]}
    save(tmp_path / "tied.safetensors", tensors)
    assert_same_tensors(gpt.read_safetensors(tmp_path / "tied.safetensors"), tensors)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.safetensors"
    save(path, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="complex"):
        save(path, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="metadata"):
        save(path, {"a": torch.zeros(2)}, {"n": 1})
    assert_same_tensors(gpt.read_safetensors(path), {"a": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def raw_file(header: object, data: bytes = b"", header_size: int | None = None) -> bytes:
    """A hand-built safetensors file, valid or not."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(encoded) if header_size is None else header_size
    return struct.pack("<Q", size) + encoded + data


def f32_entry(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


CORRUPT_FILES = {
    "shorter than the length prefix": b"\x10\x00\x00",
    "header length beyond the file": raw_file({}, header_size=1000),
    "header length near 2**64": b"\xff" * 8 + b"{}",
    "header not UTF-8": raw_file(b"\xff\xfe{}"),
    "bad JSON": raw_file(b"{'a': 1}"),
    "deeply nested JSON": raw_file(b"[" * 100_000 + b"]" * 100_000),
    "header is a list": raw_file([1, 2]),
    "entry is not an object": raw_file({"a": [1, 2]}),
    "entry lacks data_offsets": raw_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "unknown dtype": raw_file({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative size": raw_file({"a": f32_entry([-1], 0, 4)}, b"\0" * 4),
    "boolean size": raw_file({"a": f32_entry([True], 0, 4)}, b"\0" * 4),
    "float offsets": raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4),
    "offsets past the end": raw_file({"a": f32_entry([2], 0, 8)}, b"\0" * 4),
    "offsets reversed": raw_file({"a": f32_entry([0], 4, 0)}, b"\0" * 4),
    "offsets do not match shape": raw_file({"a": f32_entry([2], 0, 4)}, b"\0" * 4),
    "overlapping tensors": raw_file({"a": f32_entry([2], 0, 8), "b": f32_entry([1], 4, 8)}, b"\0" * 8),
    "gap between tensors": raw_file({"a": f32_entry([1], 0, 4), "b": f32_entry([1], 8, 12)}, b"\0" * 12),
    "bytes after the last tensor": raw_file({"a": f32_entry([1], 0, 4)}, b"\0" * 8),
    "duplicate tensor name": raw_file(
        b'{"a":'
        + json.dumps(f32_entry([1], 0, 4)).encode()
        + b',"a":'
        + json.dumps(f32_entry([1], 0, 4)).encode()
        + b"}",
        b"\0" * 4,
    ),
    "metadata not strings": raw_file({"__metadata__": {"n": 1}}),
    "truncated data": raw_file({"a": f32_entry([4], 0, 16)}, b"\0" * 10),
}


@pytest.mark.parametrize("kind", CORRUPT_FILES)
def test_each_kind_of_corrupt_file_is_refused_with_a_value_error(tmp_path, kind):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CORRUPT_FILES[kind])
    with pytest.raises(ValueError, match="bad.safetensors"):
        gpt.read_safetensors(path)
    with pytest.raises(ValueError, match="bad.safetensors"):
        gpt.read_header(path)[1]


def test_errors_name_the_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_file({"h.0.mlp.c_fc.weight": f32_entry([3], 0, 4)}, b"\0" * 4))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight.*needs 12"):
        gpt.read_safetensors(path)


def test_a_missing_file_or_a_folder_is_a_value_error(tmp_path):
    for path in (tmp_path / "nothing.safetensors", tmp_path):
        with pytest.raises(ValueError, match="cannot read"):
            gpt.read_safetensors(path)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_damaged_files_give_a_value_error_or_exactly_what_the_header_says(tmp_path_factory, data):
    """Cut or overwrite bytes anywhere in a valid file: never a crash, never a wrong tensor."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int16),
    }
    path = tmp_path_factory.mktemp("st") / "damaged.safetensors"
    save(path, tensors)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        loaded = gpt.read_safetensors(path)
    except ValueError:
        return
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    for name, tensor in loaded.items():
        assert list(tensor.shape) == header[name]["shape"]
        assert tensor.dtype == gpt.SAFETENSORS_DTYPES[header[name]["dtype"]]
        assert (
            math.prod(tensor.shape) * tensor.element_size()
            == header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        )


# --------------------------------------------------------------------------- Hugging Face weights


TINY = GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_layers=2, n_heads=4)  # the fixture's


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """input_ids (2, 6) and the logits transformers' GPT2LMHeadModel gave for them."""
    return gpt.read_safetensors(FIXTURES / "hf_tiny_logits.safetensors")


def assert_matches_transformers(model: GPTModel, reference: dict[str, torch.Tensor]) -> None:
    assert model.lm_head.weight is model.wte.weight
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    for fast in (True, False):
        model.set_fast_attention(fast)
        with torch.no_grad():
            torch.testing.assert_close(model(reference["input_ids"]), reference["logits"], rtol=0, atol=1e-5)


def hub_style_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """A model's weights laid out like the hub's GPT-2 files: Conv1D weights stored (in, out)."""
    return {
        name: param.detach().t() if gpt.HF_CONV1D_WEIGHTS.fullmatch(name) else param.detach()
        for name, param in model.named_parameters()
    }


def test_save_pretrained_directory_gives_transformers_logits(reference):
    assert gpt.load_config(FIXTURES / "hf_tiny") == TINY
    assert_matches_transformers(gpt.load_gpt2(FIXTURES / "hf_tiny"), reference)


def test_hub_style_file_gives_transformers_logits(reference):
    assert_matches_transformers(gpt.load_gpt2(FIXTURES / "hf_tiny_hub.safetensors", config=TINY), reference)


def test_a_file_alone_gives_every_size_and_assumes_64_wide_heads():
    inferred = gpt.load_config(FIXTURES / "hf_tiny_hub.safetensors")
    assert inferred == GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_layers=2, n_heads=1)


def test_a_file_alone_whose_width_has_no_64_wide_heads_asks_for_its_config(tmp_path):
    path = tmp_path / "narrow.safetensors"
    save(path, {"wte.weight": torch.zeros(10, 48), "wpe.weight": torch.zeros(4, 48)})
    with pytest.raises(ValueError, match="48-wide model.*config.json"):
        gpt.load_config(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_float32(tmp_path, dtype):
    tensors = gpt.read_safetensors(FIXTURES / "hf_tiny" / "model.safetensors")
    path = tmp_path / "half.safetensors"
    save(path, {name: tensor.to(dtype) for name, tensor in tensors.items()})
    model = gpt.load_gpt2(path, config=TINY)
    expected = gpt.load_gpt2(FIXTURES / "hf_tiny")
    with torch.no_grad():
        for param in expected.parameters():
            param.copy_(param.to(dtype).float())  # the same rounding the file went through
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=1e-6)


def test_a_present_tied_lm_head_loads_and_an_untied_one_is_refused(tmp_path, reference):
    tensors = gpt.read_safetensors(FIXTURES / "hf_tiny" / "model.safetensors")
    directory = tmp_path / "tied"
    directory.mkdir()
    (directory / "config.json").write_bytes((FIXTURES / "hf_tiny" / "config.json").read_bytes())
    wte = tensors["transformer.wte.weight"]
    save(directory / "model.safetensors", {**tensors, "lm_head.weight": wte})
    assert_matches_transformers(gpt.load_gpt2(directory), reference)
    save(directory / "model.safetensors", {**tensors, "lm_head.weight": wte + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        gpt.load_gpt2(directory)


def edited_hub_file(tmp_path: Path, edit) -> Path:
    tensors = gpt.read_safetensors(FIXTURES / "hf_tiny_hub.safetensors")
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save(path, tensors)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("h.1.mlp.c_fc.weight"),
            r"tensor h\.1\.mlp\.c_fc\.weight \(shape \(64, 256\)\) is missing",
        ),
        (
            lambda t: t.update({"h.0.attn.c_attn.scale": torch.ones(3)}),
            r"unknown tensor 'h\.0\.attn\.c_attn\.scale' \(shape \(3,\)\)",
        ),
        (lambda t: t.update({"h.2.ln_1.weight": torch.ones(64)}), r"unknown tensor 'h\.2\.ln_1\.weight'"),
        (
            lambda t: t.update({"h.0.attn.c_attn.weight": t["h.0.attn.c_attn.weight"].t()}),
            r"h\.0\.attn\.c_attn\.weight: shape \(192, 64\) in file, model expects \(64, 192\)",
        ),
        (
            lambda t: t.update({"ln_f.bias": torch.zeros(64, 1)}),
            r"ln_f\.bias: shape \(64, 1\) in file, model expects \(64,\)",
        ),
        (lambda t: t.update({"ln_f.bias": torch.zeros(64, dtype=torch.int32)}), r"ln_f\.bias is I32"),
    ],
    ids=["missing", "unknown", "extra layer", "not transposed", "wrong shape", "integer dtype"],
)
def test_loading_is_strict(tmp_path, edit, message):
    path = edited_hub_file(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        gpt.load_gpt2(path, config=TINY)


@FAST
@given(tiny_configs(), st.integers(0, 2**16))
def test_any_config_round_trips_through_a_hub_style_file(tmp_path_factory, cfg, seed):
    torch.manual_seed(seed)
    original = GPTModel(cfg).eval()
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save(path, hub_style_tensors(original))
    loaded = gpt.load_gpt2(path, config=cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), original(ids), rtol=0, atol=0)


@FAST
@given(heads=st.integers(1, 2), n_layers=st.integers(1, 2), vocab_size=st.integers(2, 40),
       context_length=st.integers(1, 12), qkv_bias=st.booleans())
def test_a_file_alone_gives_its_config_when_the_heads_are_64_wide(tmp_path_factory, heads, n_layers, vocab_size,
                                                                  context_length, qkv_bias):
    cfg = GPTConfig(vocab_size, context_length, 64 * heads, n_layers, heads, qkv_bias=qkv_bias)
    path = tmp_path_factory.mktemp("alone") / "model.safetensors"
    save(path, hub_style_tensors(GPTModel(cfg)))
    assert gpt.load_config(path) == cfg


def test_unknown_sources_are_value_errors_listing_the_presets(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty_dir").mkdir()
    for source in ("gpt2-tiny", tmp_path / "missing.safetensors", tmp_path / "weights.bin"):
        for load in (gpt.load_config, gpt.load_gpt2):
            with pytest.raises(ValueError, match="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl"):
                load(source)
    with pytest.raises(ValueError, match="no config.json"):
        gpt.load_gpt2(tmp_path / "empty_dir")
    (tmp_path / "empty_dir" / "config.json").write_bytes((FIXTURES / "hf_tiny" / "config.json").read_bytes())
    with pytest.raises(ValueError, match="no model.safetensors"):
        gpt.load_gpt2(tmp_path / "empty_dir")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_inner": 100}, "n_inner"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_head": 5}, "divisible"),
        ({"n_embd": None}, "positive integers"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),  # once loaded silently: a different model
        ({"layer_norm_epsilon": True}, "layer_norm_epsilon"),
    ],
)
def test_config_json_that_gpt_model_cannot_follow_is_refused(tmp_path, change, message):
    config = json.loads((FIXTURES / "hf_tiny" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        gpt.load_config(tmp_path)


def test_presets_are_the_four_gpt2_sizes():
    with torch.device("meta"):  # shapes only
        sizes = {
            name: sum(p.numel() for p in GPTModel(cfg).parameters()) for name, cfg in gpt.PRESETS.items()
        }
    assert sizes == {
        "gpt2-small": 124_439_808,
        "gpt2-medium": 354_823_168,
        "gpt2-large": 774_030_080,
        "gpt2-xl": 1_557_611_200,
    }


# --------------------------------------------------------------------------- generation and the CLI


@FAST
@given(model_and_tokens(), st.integers(0, 5))
def test_greedy_generation_appends_the_most_likely_token_each_step(case, max_new_tokens):
    model, token_ids = case
    output = hub.generate(model, token_ids, max_new_tokens)
    assert output.shape == (token_ids.shape[0], token_ids.shape[1] + max_new_tokens)
    assert torch.equal(output[:, : token_ids.shape[1]], token_ids)
    for step in range(token_ids.shape[1], output.shape[1]):
        context = output[:, max(0, step - model.cfg.context_length) : step]  # cropped to the context
        with torch.no_grad():
            assert torch.equal(output[:, step], model(context)[:, -1].argmax(-1))


@FAST
@given(model_and_tokens(), st.integers(1, 5), st.integers(0, 2**16))
def test_top_k_sampling_only_picks_among_the_k_most_likely(case, top_k, seed):
    model, token_ids = case
    generator = torch.Generator().manual_seed(seed)
    output = hub.generate(model, token_ids, 1, top_k=top_k, temperature=2.0, generator=generator)
    with torch.no_grad():
        logits = model(token_ids[:, -model.cfg.context_length :])[:, -1]  # (B, V)
    kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1]  # (B,)
    assert (logits.gather(-1, output[:, -1:]).squeeze(-1) >= kth_best).all()
    assert torch.equal(
        hub.generate(model, token_ids, 3, top_k=top_k, temperature=0), hub.generate(model, token_ids, 3)
    )


def test_gpt_py_help_works_offline():
    result = subprocess.run(
        [sys.executable, "gpt.py", "--help"],
        cwd=Path(gpt.__file__).parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--max-new-tokens" in result.stdout and "--model" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt2-huge", "Hello"], "gpt2-small, gpt2-medium"),
        (["--model", str(FIXTURES / "hf_tiny"), "Hello"], "fewer than GPT-2's tokenizer"),
    ],
)
def test_a_bad_model_is_one_line_on_stderr_and_exit_code_2(capsys, argv, message):
    assert hub.generate_command(gpt, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1
