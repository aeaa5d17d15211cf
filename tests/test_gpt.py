"""The claims gpt.py makes: the model's shape and causality, its two attention paths agreeing,
safetensors files read and written exactly (and damaged ones refused), Hugging Face GPT-2
weights loading to the same logits as transformers, and downloads that resume and verify."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt
from gpt import GPTConfig, GPTModel

FIXTURES = Path(__file__).parent / "fixtures"
FAST = settings(max_examples=20, deadline=None)


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


# --------------------------------------------------------------------------- safetensors


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=generator, dtype=torch.int64).to(dtype)


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
    gpt.write_safetensors(path, tensors, metadata)
    assert_same_tensors(gpt.read_safetensors(path), tensors)
    assert gpt.read_safetensors_metadata(path) == (metadata or {})
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_size % 8 == 0  # padded like the official library's files
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_tensors_sharing_storage_are_each_written(tmp_path):
    weight = torch.randn(5, 3)
    tensors = {"wte.weight": weight, "lm_head.weight": weight, "transposed": weight.t(), "row": weight[2]}
    gpt.write_safetensors(tmp_path / "tied.safetensors", tensors)
    assert_same_tensors(gpt.read_safetensors(tmp_path / "tied.safetensors"), tensors)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.safetensors"
    gpt.write_safetensors(path, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="complex"):
        gpt.write_safetensors(path, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.complex64)})
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
    "duplicate tensor name": raw_file(b'{"a":' + json.dumps(f32_entry([1], 0, 4)).encode() + b',"a":' + json.dumps(f32_entry([1], 0, 4)).encode() + b"}", b"\0" * 4),
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
        gpt.read_safetensors_metadata(path)


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
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16)}
    path = tmp_path_factory.mktemp("st") / "damaged.safetensors"
    gpt.write_safetensors(path, tensors)
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
        assert math.prod(tensor.shape) * tensor.element_size() == header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
