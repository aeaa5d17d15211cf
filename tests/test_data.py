"""Tests for data.py and datafiles.py: steps 1 and 2 of the chapter's pipeline (labelled text, tokenization)."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

import data
import datafiles
import hub
from conftest import REPO, offline_env

SEEDS = st.integers(min_value=0, max_value=2**32)


def labelled(class_sizes: list[int]) -> data.LabelledTexts:
    """A data set with unique texts "class-index", so an example can be followed by its text."""
    texts, labels = [], []
    for label, size in enumerate(class_sizes):
        texts += [f"{label}-{i}" for i in range(size)]
        labels += [label] * size
    return data.LabelledTexts(texts, labels, [f"class{label}" for label in range(len(class_sizes))])


def parts(splits: data.Splits) -> list[data.LabelledTexts]:
    return [splits.train, splits.validation, splits.test]


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


# --------------------------------------------------------------------------- balance and split


@settings(max_examples=50, deadline=None)
@given(
    class_sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=2, max_size=5),
    seed=SEEDS,
    stratify=st.booleans(),
)
def test_split_is_a_seeded_partition_with_the_books_sizes(class_sizes, seed, stratify):
    dataset = labelled(class_sizes)
    splits = data.split(dataset, seed, stratify=stratify)

    # Disjoint and covering: every example lands in exactly one split, with its own label.
    texts = [text for part in parts(splits) for text in part.texts]
    assert sorted(texts) == sorted(dataset.texts)
    label_of = dict(zip(dataset.texts, dataset.labels))
    for part in parts(splits):
        assert [label_of[text] for text in part.texts] == part.labels
        assert part.label_names == dataset.label_names
    assert splits.label_names == dataset.label_names

    n = len(dataset)
    if stratify:
        # Every class is cut by the same fractions, each part within one example of its share.
        for label, size in enumerate(class_sizes):
            for part, fraction in zip(parts(splits), (0.7, 0.1, 0.2)):
                assert abs(part.labels.count(label) - fraction * size) <= 1 + 1e-9
    else:
        # The book's cut: int(0.7 N), int(0.1 N), the rest (exact integer arithmetic here).
        assert [len(part) for part in parts(splits)] == [7 * n // 10, n // 10, n - 7 * n // 10 - n // 10]

    # Deterministic: the same seed gives the same splits, in the same order.
    assert data.split(dataset, seed, stratify=stratify) == splits


def test_split_depends_on_the_seed_and_mixes_the_classes():
    dataset = labelled([50, 50])
    first, second = data.split(dataset, 1), data.split(dataset, 2)
    assert first.train.texts != second.train.texts
    # Stratified parts are shuffled after the per-class cut, not all class 0 then all class 1.
    assert first.train.labels != sorted(first.train.labels)


def test_split_rejects_fractions_that_do_not_add_up():
    with pytest.raises(ValueError, match="summing to 1"):
        data.split(labelled([5, 5]), 0, fractions=(0.7, 0.2, 0.2))


@settings(max_examples=40, deadline=None)
@given(class_sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=2, max_size=4), seed=SEEDS)
def test_balance_keeps_every_minority_example(class_sizes, seed):
    dataset = labelled(class_sizes)
    balanced = data.balance(dataset, seed)
    smallest = min(class_sizes)
    assert balanced.class_counts() == [smallest] * len(class_sizes)
    assert len(set(balanced.texts)) == len(balanced.texts) and set(balanced.texts) <= set(dataset.texts)
    for label, size in enumerate(class_sizes):
        if size == smallest:
            assert {f"{label}-{i}" for i in range(size)} <= set(balanced.texts)
    assert data.balance(dataset, seed) == balanced


def test_balance_refuses_a_class_without_examples():
    dataset = data.LabelledTexts(["a", "b"], [0, 0], ["ham", "spam"])
    with pytest.raises(ValueError, match="'spam' has no examples"):
        data.balance(dataset, 0)


# --------------------------------------------------------------------------- the real SMS file


def test_the_sms_spam_collection_has_4827_ham_and_747_spam(sms_spam_file):
    dataset = data.read_labelled(sms_spam_file)
    assert dataset.label_names == ["ham", "spam"]
    assert dataset.class_counts() == [4827, 747]
    assert dataset.texts[0].startswith("Go until jurong point")


def test_the_books_splits_are_1045_149_300_and_balanced(sms_spam_file, tokenizer):
    dataset = data.read_labelled(sms_spam_file)
    splits = data.book_splits(dataset, seed=123)
    assert [len(part) for part in parts(splits)] == [1045, 149, 300]
    # Balanced: all 747 spam and 747 of the ham, spread over the splits (pinned for seed 123).
    assert [part.class_counts() for part in parts(splits)] == [[530, 515], [76, 73], [141, 159]]
    spam = {text for text, label in zip(dataset.texts, dataset.labels) if label == 1}
    assert {text for part in parts(splits) for text, label in zip(part.texts, part.labels) if label == 1} == spam
    # A fixed seed gives identical splits on every call, and load_splits is the same preparation.
    assert data.book_splits(dataset, seed=123) == splits
    assert data.load_splits(sms_spam_file, seed=123) == splits
    assert data.book_splits(dataset, seed=124) != splits
    # Seed 123's training set: longest text 120 tokens (the book's number too), mean about 30.5.
    lengths = data.ClassificationDataset.from_texts(splits.train, tokenizer, None).lengths
    assert max(lengths) == 120
    assert 30 < sum(lengths) / len(lengths) < 31


def test_the_unbalanced_split_is_stratified(sms_spam_file):
    splits = data.load_splits(sms_spam_file, seed=123, balanced=False)
    assert sum(len(part) for part in parts(splits)) == 5574
    for part, fraction in zip(parts(splits), (0.7, 0.1, 0.2)):
        ham, spam = part.class_counts()
        assert abs(ham - fraction * 4827) <= 1 and abs(spam - fraction * 747) <= 1


# --------------------------------------------------------------------------- bad input


SMS_ERRORS = [
    (b"ham\thello\nspam no tab here\n", ["line 2", "no tab"]),
    (b"ham\thello\nspam\t   \n", ["line 2", "empty"]),
    (b"ham\thello\nspam\tok\neggs\tbuy now\n", ["line 3", "unknown label 'eggs'", "ham, spam"]),
    (b"", ["empty"]),
    (b"\n \n", ["empty"]),
    (b"ham\thello\nspam\tcaf\xe9\n", ["line 2", "not UTF-8"]),
    (b"ham\thello\nham\tagain\n", ["two classes"]),
]


@pytest.mark.parametrize("content, expected", SMS_ERRORS)
def test_bad_sms_files_raise_errors_naming_file_and_line(tmp_path, content, expected):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(content)
    for read in (data.read_labelled, data.load_splits):
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        assert str(path) in message
        for text in expected:
            assert text in message


def test_a_missing_file_is_a_value_error_naming_it(tmp_path):
    for read in (data.read_labelled, data.load_splits):
        with pytest.raises(ValueError, match="nowhere.csv: no such file"):
            read(tmp_path / "nowhere.csv")


def test_sms_format_accepts_crlf_a_bom_and_blank_lines(tmp_path):
    path = tmp_path / "messages.txt"
    path.write_bytes("\ufeffham\tOi, tudo bem?\r\n\r\nspam\tGanhe já!\r\n".encode())
    dataset = data.read_labelled(path)
    assert dataset.texts == ["Oi, tudo bem?", "Ganhe já!"] and dataset.labels == [0, 1]
    renamed = tmp_path / "messages.csv"  # the format is in the content, not the name
    renamed.write_bytes(path.read_bytes())
    assert data.read_labelled(renamed) == dataset


TABLE_ERRORS = [
    ("text,category\nhello,a\nbye,b\n", {}, ["line 1", "no column 'label'", "['text', 'category']"]),
    ('text,label\n"two\nlines",a\n,b\n', {}, ["line 4", "'text' field is empty"]),
    ("text,label\nhello,\n", {}, ["line 2", "'label' field is empty"]),
    ("text,label\nhello, world,a\n", {}, ["line 2", "3 fields", "quote"]),
    ("text,label\nhello,a\nbye,c\n", {"label_names": ["a", "b"]}, ["line 3", "unknown label 'c'"]),
    ("text,label\nhello,a\nbye,a\n", {}, ["two classes"]),
    ("text,label\n", {}, ["no examples"]),
]


@pytest.mark.parametrize("content, options, expected", TABLE_ERRORS)
def test_bad_tables_raise_errors_naming_file_and_line(tmp_path, content, options, expected):
    path = tmp_path / "data.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as error:
        data.read_labelled(path, **options)
    message = str(error.value)
    assert str(path) in message
    for text in expected:
        assert text in message


# --------------------------------------------------------------------------- your own CSV / TSV


def test_real_world_csv_quotes_commas_newlines_bom_crlf(tmp_path):
    path = tmp_path / "reviews.csv"
    content = (
        "\ufeffid,text,label\r\n"
        '1,"Great, really great",pos\r\n'
        '2,"Line one\r\nline two ""quoted""",neg\r\n'
        "3,plain,neutral\r\n"
    )
    path.write_bytes(content.encode("utf-8"))
    dataset = data.read_labelled(path)
    assert dataset.texts == ["Great, really great", 'Line one\r\nline two "quoted"', "plain"]
    assert dataset.label_names == ["neg", "neutral", "pos"]  # sorted: a stable order
    assert [dataset.label_names[y] for y in dataset.labels] == ["pos", "neg", "neutral"]


def test_tsv_custom_columns_fixed_label_names_and_a_sniffed_delimiter(tmp_path):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("message\tclass\tsource\nhello, there\tz\tweb\nbye\ta\tsms\n", encoding="utf-8")
    dataset = data.read_labelled(tsv, text_column="message", label_column="class", label_names=["z", "a"])
    assert dataset.texts == ["hello, there", "bye"]
    assert dataset.label_names == ["z", "a"] and dataset.labels == [0, 1]

    semicolons = tmp_path / "data.txt"
    semicolons.write_text("text;label\nbom dia;a\nboa noite;b\nola;c\n", encoding="utf-8")
    assert data.read_labelled(semicolons).texts == ["bom dia", "boa noite", "ola"]


LABEL_TEXT = st.text(min_size=1, max_size=12).filter(lambda s: s == s.strip())
BODY_TEXT = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=30, deadline=None)
@given(
    names=st.lists(LABEL_TEXT, min_size=2, max_size=4, unique=True),
    rows=st.lists(st.tuples(BODY_TEXT, st.integers(min_value=0, max_value=3)), max_size=10),
)
def test_label_names_round_trip_through_a_csv_file(names, rows):
    rows = [(f"text {i}", i) for i in range(len(names))] + [(text, k % len(names)) for text, k in rows]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["label", "text"])
            writer.writerows([names[k], text] for text, k in rows)
        dataset = data.read_labelled(path)
    assert dataset.label_names == sorted(names)
    assert dataset.texts == [text for text, _ in rows]
    assert [dataset.label_names[y] for y in dataset.labels] == [names[k] for _, k in rows]


def test_a_three_class_csv_goes_all_the_way_to_batches(tmp_path, tokenizer):
    path = tmp_path / "topics.csv"
    rows = [(f"message number {i} about {topic}", topic) for i in range(30) for topic in ("sport", "art", "news")]
    with path.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file).writerows([("text", "label"), *rows])
    for balanced in (True, False):
        splits = data.load_splits(path, seed=0, balanced=balanced)
        assert splits.label_names == ["art", "news", "sport"]
        assert [len(part) for part in parts(splits)] == [63, 9, 18]
    assert [part.class_counts() for part in parts(splits)] == [[21] * 3, [3] * 3, [6] * 3]  # stratified
    dataset = data.ClassificationDataset.from_texts(splits.train, tokenizer, None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=data.bucket_batches(dataset.lengths, 8, seed=0), collate_fn=data.collate
    )
    batches = list(loader)
    assert sum(len(batch.labels) for batch in batches) == 63
    assert sorted(torch.cat([batch.labels for batch in batches]).tolist()) == sorted(splits.train.labels)


def test_separate_files_are_used_as_given(tmp_path):
    files = {}
    for name, count in (("train", 12), ("validation", 3), ("test", 4)):
        files[name] = tmp_path / f"{name}.tsv"
        lines = [f"{name} {i}\t{'b' if i % 3 == 0 else 'a'}" for i in range(count)]
        files[name].write_text("text\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    splits = data.load_splits(files["train"], validation_path=files["validation"], test_path=files["test"])
    assert splits.train.class_counts() == [4, 4]  # balanced=True undersamples the training file only
    assert len(splits.validation) == 3 and len(splits.test) == 4
    assert splits.test.texts == [f"test {i}" for i in range(4)]
    unbalanced = data.load_splits(
        files["train"], balanced=False, validation_path=files["validation"], test_path=files["test"]
    )
    assert len(unbalanced.train) == 12
    with pytest.raises(ValueError, match="both --validation-data and --test-data"):
        data.load_splits(files["train"], validation_path=files["validation"])
    sms = tmp_path / "validation"
    sms.write_text("ham\toi\nspam\tpromo\n", encoding="utf-8")
    with pytest.raises(ValueError, match="the labels are \\['ham', 'spam'\\], expected \\['a', 'b'\\]"):
        data.load_splits(files["train"], validation_path=sms, test_path=files["test"])


def test_a_separate_sms_format_test_file_may_hold_one_class(tmp_path):
    # As for CSV/TSV files: a small validation or test file may lack a class (it used to be refused).
    train = tmp_path / "train"
    train.write_text("".join(f"{'spam' if i % 2 else 'ham'}\ttext {i}\n" for i in range(10)), encoding="utf-8")
    only_spam = tmp_path / "only_spam"
    only_spam.write_text("spam\tpromo\nspam\tprize\n", encoding="utf-8")
    splits = data.load_splits(train, validation_path=only_spam, test_path=only_spam)
    assert splits.test.class_counts() == [0, 2]
    with pytest.raises(ValueError, match="every example has the label 'spam'"):
        data.read_labelled(only_spam)  # a training file still needs two classes


# --------------------------------------------------------------------------- files people have


def one_line_value_error(call) -> str:
    """The message of the ValueError `call()` raises, checked to be one line."""
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message and "\r" not in message
    return message


COLUMN_NAME = LABEL_TEXT.filter(lambda s: s != "id")  # "id" is the first column


@settings(max_examples=60, deadline=None)
@given(
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
    suffix=st.sampled_from([".csv", ".tsv", ".txt", ""]),
    columns=st.lists(COLUMN_NAME, min_size=2, max_size=2, unique=True),
    rows=st.lists(st.tuples(BODY_TEXT, LABEL_TEXT), min_size=2, max_size=12),
)
def test_any_delimiter_round_trips_with_the_delimiter_found_from_the_header(delimiter, suffix, columns, rows):
    """Whatever the extension says: an Excel .csv in Portuguese is split by ';'."""
    rows = [(text, label) for text, label in rows] + [("one more", "another class")]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file, delimiter=delimiter)
            writer.writerow(["id", *columns])
            writer.writerows([i, text, label] for i, (text, label) in enumerate(rows))
        if len({label for _, label in rows}) < 2:
            return
        dataset = data.read_labelled(path, text_column=columns[0], label_column=columns[1])
        forced = data.read_labelled(path, columns[0], columns[1], delimiter="tab" if delimiter == "\t" else delimiter)
    assert dataset.texts == [text for text, _ in rows]
    assert [dataset.label_names[y] for y in dataset.labels] == [label for _, label in rows]
    assert forced == dataset


WINDOWS_TEXT = st.text(st.characters(codec="cp1252", exclude_characters="\x00"), min_size=1, max_size=30).filter(
    str.strip)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(WINDOWS_TEXT, min_size=2, max_size=10))
def test_cp1252_text_with_accents_reads_back_exactly(texts):
    rows = [("Promoção: você ganhou um prêmio!", "spam"), *((text, "ham") for text in texts)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mensagens.csv"
        with path.open("w", encoding="cp1252", newline="") as file:
            csv.writer(file, delimiter=";").writerows([("mensagem", "classe"), *rows])
        dataset = data.read_labelled(path, "mensagem", "classe", encoding="cp1252")
        message = one_line_value_error(lambda: data.read_labelled(path, "mensagem", "classe"))
    assert dataset.texts == [text for text, _ in rows]
    assert dataset.label_names == ["ham", "spam"] and dataset.labels == [1] + [0] * len(texts)
    assert "line 2: not UTF-8 (byte 0xe7)" in message and "--encoding cp1252" in message


def test_a_brazilian_excel_export_trains_with_encoding_cp1252(tmp_path):
    """`;` between columns, cp1252 bytes, Windows line ends, a header in Portuguese."""
    path = tmp_path / "mensagens.csv"
    lines = ["mensagem;classe"] + [f"Olá, tudo bem? Reunião às {i}h;normal" for i in range(20)]
    lines += [f"Promoção imperdível nº {i}: você ganhou!;spam" for i in range(20)]
    path.write_bytes("\r\n".join(lines).encode("cp1252"))
    splits = data.load_splits(path, text_column="mensagem", label_column="classe", encoding="cp1252")
    assert splits.label_names == ["normal", "spam"] and [len(part) for part in parts(splits)] == [28, 4, 8]
    assert "Olá, tudo bem? Reunião às 0h" in [text for part in parts(splits) for text in part.texts]
    message = one_line_value_error(lambda: data.load_splits(path, text_column="mensagem", label_column="classe"))
    assert message == f"{path}, line 2: not UTF-8 (byte 0xe1); if it was saved by Excel, try --encoding cp1252"
    message = one_line_value_error(lambda: data.load_splits(path, encoding="cp1252"))
    assert "no column 'text'; the columns are ['mensagem', 'classe']" in message  # split at ';', not one column
    assert "--text-column" in message and "--label-column" in message and "text_column=" not in message


@pytest.mark.parametrize("options, expected", [
    ({"delimiter": ","}, ["no column 'mensagem'", "['mensagem;classe'] (split at ',')",
                          "and the delimiter with --delimiter"]),
    ({"delimiter": "x"}, ["--delimiter 'x'", "tab"]),
    ({"encoding": "klingon"}, ["--encoding 'klingon'", "cp1252"]),
    ({"encoding": "rot13"}, ["--encoding 'rot13'"]),
    ({"label_column": "mensagem"}, ["--text-column and --label-column both name 'mensagem'"]),
])
def test_wrong_options_name_their_flags(tmp_path, options, expected):
    path = tmp_path / "mensagens.csv"
    path.write_text("mensagem;classe\nbom dia;a\nganhe;b\n", encoding="utf-8")
    message = one_line_value_error(lambda: data.read_labelled(path, **{"text_column": "mensagem",
                                                                       "label_column": "classe", **options}))
    for text in expected:
        assert text in message


FRAGMENTS = [b"ham\t", b"spam\t", b"text", b"label", b",", b";", b"\t", b"|", b"\n", b"\r\n", b'"', b"hi",
             b"\xe9", b"\xef\xbb\xbf", b"\x00", b" ", b"PK\x03\x04", b"readme"]
ANY_BYTES = st.tuples(st.sampled_from([b"", b"text,label\n", b"label;text\r\n", b"ham\thi\n"]),
                      st.binary(max_size=300) | st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)
                      ).map(b"".join)  # a plausible start now and then, so that rows get parsed too


@settings(max_examples=300, deadline=None)
@given(content=ANY_BYTES, suffix=st.sampled_from(["", ".csv", ".tsv", ".txt", ".zip"]),
       zipped_as=st.sampled_from([None, "SMSSpamCollection", "data.csv", "notes.txt"]),
       encoding=st.sampled_from(["utf-8", "cp1252", "latin-1", "utf-16"]), balanced=st.booleans())
def test_any_bytes_give_labelled_texts_or_a_one_line_value_error(content, suffix, zipped_as, encoding, balanced):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"any{suffix}"
        if zipped_as is None:
            path.write_bytes(content)
        else:
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(zipped_as, content)
                archive.writestr("readme", b"about the data")
        for read in (data.read_labelled, functools.partial(data.load_splits, balanced=balanced)):
            try:
                result = read(path, encoding=encoding)
            except ValueError as error:
                assert str(error) and "\n" not in str(error) and "\r" not in str(error)
            else:
                assert isinstance(result, (data.LabelledTexts, data.Splits))


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_the_uci_archive_as_downloaded_is_accepted(sms_spam_file, tmp_path):
    """`--data smsspamcollection.zip`: the archive holds SMSSpamCollection and a readme."""
    archive = zip_of(tmp_path / "smsspamcollection.zip",
                     {"readme": b"SMS Spam Collection v.1\n", hub.SMS_SPAM_MEMBER: sms_spam_file.read_bytes()})
    splits = data.load_splits(archive, seed=123)
    assert splits == data.load_splits(sms_spam_file, seed=123)
    assert [len(part) for part in parts(splits)] == [1045, 149, 300]
    # A broken line inside it is reported in the archive and its member.
    broken = zip_of(tmp_path / "broken.zip", {hub.SMS_SPAM_MEMBER: b"ham\tok\nspam\tfine\nham no tab\n"})
    assert one_line_value_error(lambda: data.read_labelled(broken)) == (
        f"{broken}, file SMSSpamCollection, line 3: no tab; each line must be label<TAB>text")


def test_a_zip_with_one_data_file_beside_a_readme_is_read(tmp_path):
    rows = "review,sentiment\n" + "".join(f"text {i},{'good' if i % 2 else 'bad'}\n" for i in range(20))
    archive = zip_of(tmp_path / "reviews.zip", {"reviews/README.md": b"# About", "reviews/reviews.csv": rows.encode(),
                                                "__MACOSX/reviews/._reviews.csv": b"\x00\x05", "reviews/": b""})
    dataset = data.read_labelled(archive, "review", "sentiment")
    assert dataset.texts == [f"text {i}" for i in range(20)] and dataset.label_names == ["bad", "good"]


def test_a_zip_without_one_data_file_or_too_large_is_one_line(tmp_path, monkeypatch):
    cases = {
        "two.zip": ({"a.csv": b"text,label\n", "b.csv": b"text,label\n"}, "holds ['a.csv', 'b.csv']"),
        "readme.zip": ({"readme": b"hello"}, "holds ['readme']"),
        "empty.zip": ({}, "holds []"),
        "big.zip": ({hub.SMS_SPAM_MEMBER: b"ham\thi\n" * (hub.SMS_SPAM_SIZE // 7 + 1)}, "larger than 477,907 bytes"),
    }
    for name, (members, expected) in cases.items():
        message = one_line_value_error(lambda: data.read_labelled(zip_of(tmp_path / name, members)))
        assert expected in message and "--data" in message and str(tmp_path / name) in message
    monkeypatch.setattr(datafiles, "MAX_MEMBER_BYTES", 1000)  # (1 GiB in use)
    bomb = zip_of(tmp_path / "bomb.zip", {"data.csv": b"text,label\n" + b"a" * 10_000_000 + b",x\n"})
    assert bomb.stat().st_size < 100_000
    assert "data.csv: larger than 1,000 bytes" in one_line_value_error(lambda: data.read_labelled(bomb))
    fake = tmp_path / "fake.zip"
    fake.write_text("text,label\n", encoding="utf-8")
    assert "not a zip archive" in one_line_value_error(lambda: data.read_labelled(fake))


# --------------------------------------------------------------------------- too little data


def test_the_readmes_two_row_example_is_too_few_texts(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('review,sentiment\n"Great phone, battery lasts two days",positive\n'
                    '"Stopped working after a week",negative\n', encoding="utf-8")
    expected = {True: "1 / 0 / 1; each split needs one text or more and training two classes, so 10 texts or more "
                      "in all; add texts",  # the book's cut: int(0.7 N), int(0.1 N), the rest
                False: "2 / 0 / 0; each split needs one text or more and training two classes; add texts"}
    for balanced in (True, False):
        message = one_line_value_error(lambda: data.load_splits(path, balanced=balanced, text_column="review",
                                                                label_column="sentiment"))
        assert message == f"{path}: too few texts: 2 texts would split 70/10/20 into {expected[balanced]}"


def test_a_tiny_class_under_balancing_says_what_balancing_did(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"text {i},a\n" for i in range(30)) + "rare,x\n", encoding="utf-8")
    message = one_line_value_error(lambda: data.load_splits(path))
    assert message == (f"{path}: too few texts: balancing undersamples every class to the smallest, 'x', which has "
                       f"1 text: 2 texts in all, too few to split 70/10/20 (1 / 0 / 1; each split needs one text or "
                       f"more and training two classes, so 10 texts or more in all); add texts or use --no-balanced")
    splits = data.load_splits(path, balanced=False)  # all 31 texts, stratified
    assert [part.class_counts() for part in parts(splits)] == [[21, 1], [3, 0], [6, 0]]


@settings(max_examples=40, deadline=None)
@given(class_sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4), balanced=st.booleans(), seed=SEEDS)
def test_load_splits_refuses_exactly_the_data_that_leaves_a_split_empty(class_sizes, balanced, seed):
    dataset = labelled(class_sizes)
    expected = data.book_splits(dataset, seed) if balanced else data.split(dataset, seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        with path.open("w", encoding="utf-8", newline="") as file:
            names = [dataset.label_names[y] for y in dataset.labels]
            csv.writer(file).writerows([("text", "label"), *zip(dataset.texts, names)])
        enough = all(len(part) for part in parts(expected)) and len(set(expected.train.labels)) >= 2
        if enough:
            assert data.load_splits(path, seed=seed, balanced=balanced) == expected
        else:
            message = one_line_value_error(lambda: data.load_splits(path, seed=seed, balanced=balanced))
            assert "too few texts" in message
            assert " / ".join(str(len(part)) for part in parts(expected)) in message
    if balanced:  # the book's cut needs 10 texts in all: int(0.1 N) >= 1
        assert enough == (min(class_sizes) * len(class_sizes) >= 10)


# --------------------------------------------------------------------------- where the tests find the SMS file


def load_conftest(tmp_path: Path, monkeypatch, environment: dict[str, str]):
    """A fresh copy of tests/conftest.py, in a repository folder with nothing beside it."""
    folder = tmp_path / "clone" / "tests"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).parent / "conftest.py", folder / "conftest.py")
    monkeypatch.delenv("SMS_SPAM_FILE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("conftest_copy", folder / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tests_find_the_sms_file_in_three_places_and_say_so(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    nowhere = load_conftest(tmp_path, monkeypatch, {"GPT2_CLASSIFICATION_CACHE": str(cache)})
    cached = cache / "sms_spam" / "SMSSpamCollection"
    beside = tmp_path / "shared" / "data" / "sms_spam" / "SMSSpamCollection"
    for place in (str(cached), str(beside), "SMS_SPAM_FILE", "`python train.py` once"):
        assert place in nowhere.SMS_SPAM_MISSING

    beside.parent.mkdir(parents=True)
    beside.write_text("ham\thi\n")
    assert load_conftest(tmp_path, monkeypatch, {"GPT2_CLASSIFICATION_CACHE": str(cache)}).SMS_SPAM_FILE == beside
    cached.parent.mkdir(parents=True)
    cached.write_text("ham\thi\n")  # the download cache comes first
    assert load_conftest(tmp_path, monkeypatch, {"GPT2_CLASSIFICATION_CACHE": str(cache)}).SMS_SPAM_FILE == cached
    chosen = load_conftest(tmp_path, monkeypatch, {"GPT2_CLASSIFICATION_CACHE": str(cache),
                                                   "SMS_SPAM_FILE": str(tmp_path / "mine")})
    assert chosen.SMS_SPAM_FILE == tmp_path / "mine" and "SMS_SPAM_FILE" in chosen.SMS_SPAM_MISSING


def test_a_missing_sms_file_is_a_skip_that_says_where_to_get_it(tmp_path):
    """A fresh clone with no copy anywhere: pytest's summary shows the reason (-rfEs in pyproject.toml)."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copyfile(REPO / "pyproject.toml", clone / "pyproject.toml")
    shutil.copyfile(REPO / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    test = "def test_it(sms_spam_file):\n    assert sms_spam_file.is_file()\n"
    (clone / "tests" / "test_needs_it.py").write_text(test)
    env = {name: value for name, value in os.environ.items() if name != "SMS_SPAM_FILE"}
    env.update(GPT2_CLASSIFICATION_CACHE=str(tmp_path / "empty-cache"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "run `python train.py` once" in skipped[0]
    assert str(tmp_path / "empty-cache" / "sms_spam" / "SMSSpamCollection") in skipped[0]


# --------------------------------------------------------------------------- tokenization


def test_endoftext_inside_a_text_is_ordinary_text(tokenizer):
    text = "free prize <|endoftext|> reply now"
    with pytest.raises(ValueError):
        tokenizer.encode(text)  # tiktoken's default refuses special-token text
    token_ids = data.encode(tokenizer, text)
    assert data.PAD_TOKEN_ID not in token_ids
    assert tokenizer.decode(token_ids) == text


def test_the_shipped_bpe_files_are_openais(tmp_path, monkeypatch):
    for name, sha256 in hub.GPT2_BPE_SHA256.items():
        assert hashlib.sha256((hub.GPT2_BPE_DIR / name).read_bytes()).hexdigest() == sha256
    assert hub.GPT2_BPE_SHA256 == {"vocab.bpe": tiktoken_pins()["vocab_bpe_hash"],
                                   "encoder.json": tiktoken_pins()["encoder_json_hash"]}
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # tiktoken's loader caches what it reads
    try:
        theirs = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(hub.GPT2_BPE_DIR / "vocab.bpe"),
                                                               str(hub.GPT2_BPE_DIR / "encoder.json"))
    except ImportError:  # tiktoken < 0.10 reads local paths through blobfile only
        pytest.skip("this tiktoken reads local files only with blobfile installed")
    assert data.get_tokenizer()._mergeable_ranks == theirs


def tiktoken_pins() -> dict[str, str]:
    """The sha256 tiktoken itself pins for GPT-2's files, read from its source."""
    source = inspect.getsource(openai_public.gpt2)
    return dict(re.findall(r'(\w+_hash)="([0-9a-f]{64})"', source))


@pytest.fixture(scope="module")
def tiktokens_gpt2():
    """tiktoken's own "gpt2" Encoding: its constructor's arguments, the ranks from its own loader."""
    with pytest.MonkeyPatch.context() as monkeypatch, tempfile.TemporaryDirectory() as cache:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(hub.GPT2_BPE_DIR / "vocab.bpe"),
                                                                  str(hub.GPT2_BPE_DIR / "encoder.json"))
        except ImportError:
            pytest.skip("this tiktoken reads local files only with blobfile installed")
    return tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80) | st.from_regex(r"[ \t\nA-Za-z0-9'!?.,]{0,60}", fullmatch=True))
def test_the_tokenizer_is_tiktokens_gpt2(tokenizer, tiktokens_gpt2, text):
    token_ids = data.encode(tokenizer, text)
    assert token_ids == tiktokens_gpt2.encode(text, disallowed_special=())
    assert tokenizer.decode(token_ids) == text


def test_known_gpt2_token_ids(tokenizer):
    assert data.encode(tokenizer, "Hello world") == [15496, 995]
    assert data.encode(tokenizer, " the") == [262] and tokenizer.eot_token == data.END_OF_TEXT_ID == 50256
    assert tokenizer.n_vocab == 50257


def test_tokenizing_needs_no_network_and_no_cache(tmp_path):
    """A fresh clone offline: tiktoken's cache empty, every connection refused."""
    env = offline_env(tmp_path)
    code = "import data; print(data.encode(data.get_tokenizer(), 'Hello world'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[15496, 995]", result.stderr
    assert list((tmp_path / "tiktoken-cache").iterdir()) == []  # nothing fetched, nothing cached


def copy_of_the_bpe_files(folder: Path) -> Path:
    folder.mkdir()
    for name in hub.GPT2_BPE_SHA256:
        shutil.copyfile(hub.GPT2_BPE_DIR / name, folder / name)
    return folder


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_damaged_bpe_files_fall_back_to_tiktoken_then_say_how_to_fix_it(tmp_path, monkeypatch, damage):
    folder = copy_of_the_bpe_files(tmp_path / "gpt2_bpe")
    if damage == "missing":
        (folder / "encoder.json").unlink()
    else:
        (folder / "vocab.bpe").write_bytes((folder / "vocab.bpe").read_bytes().replace(b"h e", b"e h", 1))
    fetched = []
    monkeypatch.setattr(hub.tiktoken, "get_encoding", lambda name: fetched.append(name) or "tiktoken's")
    assert hub.gpt2_tokenizer(folder) == "tiktoken's" and fetched == ["gpt2"]
    hub.gpt2_tokenizer.cache_clear()

    def offline(name):
        raise ConnectionError("Max retries exceeded with url:\nopenaipublic.blob.core.windows.net")

    monkeypatch.setattr(hub.tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError) as error:
        hub.gpt2_tokenizer(folder)
    message = str(error.value)
    assert ("damaged" if damage == "changed" else "No such file") in message and "\n" not in message
    assert "git checkout -- gpt2_bpe" in message and "ConnectionError" in message


def test_files_that_disagree_are_not_gpt2s():
    vocab_bpe = (hub.GPT2_BPE_DIR / "vocab.bpe").read_text(encoding="utf-8")
    encoder_json = (hub.GPT2_BPE_DIR / "encoder.json").read_text(encoding="utf-8")
    swapped = vocab_bpe.replace("\nh e\ni n\n", "\ni n\nh e\n", 1)  # two merges in the other order
    assert swapped != vocab_bpe
    with pytest.raises(ValueError, match="disagree"):
        hub.gpt2_mergeable_ranks(swapped, encoder_json)


def test_only_gpt2s_tokenizer_is_known():
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        data.get_tokenizer("gpt5")


def test_the_dataset_truncates_and_counts_what_it_cut(tokenizer):
    texts = data.LabelledTexts(["hi", "a somewhat longer message here", "ok then"], [0, 1, 0], ["ham", "spam"])
    full_lengths = [len(data.encode(tokenizer, text)) for text in texts.texts]

    whole = data.ClassificationDataset.from_texts(texts, tokenizer, None)
    assert whole.lengths == full_lengths and whole.num_truncated == 0

    cut = data.ClassificationDataset.from_texts(texts, tokenizer, 2)
    assert cut.lengths == [min(n, 2) for n in full_lengths]
    assert cut.num_truncated == sum(n > 2 for n in full_lengths) > 0
    token_ids, label = cut[1]
    assert token_ids == data.encode(tokenizer, texts.texts[1])[:2] and label == 1
    assert isinstance(token_ids, list) and isinstance(label, int) and len(cut) == 3


@settings(max_examples=50, deadline=None)
@given(
    sequences=st.lists(
        st.lists(st.integers(min_value=0, max_value=50255), min_size=1, max_size=20), min_size=1, max_size=8
    ),
    extra=st.integers(min_value=0, max_value=5),
    fixed=st.booleans(),
)
def test_collate_pads_to_the_longest_and_keeps_real_lengths(sequences, extra, fixed):
    examples = [(ids, i % 3) for i, ids in enumerate(sequences)]
    longest = max(len(ids) for ids in sequences)
    pad_to = longest + extra if fixed else None
    batch = data.collate(examples, pad_to=pad_to)

    assert batch.token_ids.shape == (len(sequences), pad_to or longest)
    assert batch.token_ids.dtype == batch.lengths.dtype == batch.labels.dtype == torch.long
    assert batch.lengths.tolist() == [len(ids) for ids in sequences]
    assert batch.labels.tolist() == [i % 3 for i in range(len(sequences))]
    for row, ids in zip(batch.token_ids, sequences):
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids) :] == data.PAD_TOKEN_ID).all()


def test_collate_errors_and_batch_to():
    with pytest.raises(ValueError, match="pad_to 2 is shorter than the batch's longest text \\(3 tokens\\)"):
        data.collate([([1, 2, 3], 0)], pad_to=2)
    with pytest.raises(ValueError, match="empty"):
        data.collate([])
    batch = data.collate([([5], 1), ([6, 7], 0)], pad_id=0)
    assert batch.token_ids.tolist() == [[5, 0], [6, 7]]
    moved = batch.to("meta")
    assert moved.token_ids.device.type == moved.lengths.device.type == moved.labels.device.type == "meta"


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=200), max_size=300),
    batch_size=st.integers(min_value=1, max_value=16),
    window=st.integers(min_value=1, max_value=5),
    seed=SEEDS,
    epoch=st.integers(min_value=0, max_value=10),
)
def test_bucketing_visits_every_example_exactly_once_per_epoch(lengths, batch_size, window, seed, epoch):
    batches = data.bucket_batches(lengths, batch_size, seed, epoch, window=window)
    assert len(batches) == -(-len(lengths) // batch_size)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert sum(len(batch) < batch_size for batch in batches) <= 1
    assert data.bucket_batches(lengths, batch_size, seed, epoch, window=window) == batches  # (seed, epoch) decide


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), max_size=100),
    batch_size=st.integers(min_value=1, max_value=8),
    seed=SEEDS,
)
def test_one_window_holding_everything_gives_the_sorted_batches(lengths, batch_size, seed):
    evaluation = data.bucket_batches(lengths, batch_size)
    in_order = [lengths[i] for batch in evaluation for i in batch]
    assert in_order == sorted(lengths)
    training = data.bucket_batches(lengths, batch_size, seed, window=len(lengths) + 1)
    as_lengths = lambda sampler: sorted(tuple(sorted(lengths[i] for i in batch)) for batch in sampler)  # noqa: E731
    assert as_lengths(training) == as_lengths(evaluation)


def test_bucketing_reshuffles_every_epoch_and_saves_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 120, (1000,), generator=generator).tolist()
    epoch0 = data.bucket_batches(lengths, 8, seed=123, epoch=0, window=10)
    epoch1 = data.bucket_batches(lengths, 8, seed=123, epoch=1, window=10)
    assert epoch0 != epoch1 and sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))
    assert data.bucket_batches(lengths, 8, seed=124, window=10) != epoch0
    # The batches themselves are shuffled: with one window, their order is not the length order.
    longest = [max(lengths[i] for i in batch) for batch in data.bucket_batches(lengths, 8, 0, window=1000)]
    assert longest != sorted(longest)

    def pad_tokens(batches):
        return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)

    unbucketed = [list(range(start, start + 8)) for start in range(0, 1000, 8)]  # random lengths, no sorting
    assert pad_tokens(epoch0) < 0.2 * pad_tokens(unbucketed)


# --------------------------------------------------------------------------- download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def web_folder(tmp_path):
    """A folder served over http://127.0.0.1 for the duration of a test."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_extracts_verifies_and_caches_the_collection(sms_spam_file, web_folder, tmp_path):
    folder, base_url = web_folder
    with zipfile.ZipFile(folder / "sms.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(sms_spam_file, "SMSSpamCollection")
        archive.writestr("readme", "SMS Spam Collection v.1")
    cache = tmp_path / "cache"
    reports = []
    path = hub.download_sms_spam(cache, progress=lambda done, total: reports.append(done), url=f"{base_url}/sms.zip")
    assert path == cache / "sms_spam" / "SMSSpamCollection"
    assert path.read_bytes() == sms_spam_file.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["SMSSpamCollection"]  # the archive is gone
    assert reports and reports[-1] == (folder / "sms.zip").stat().st_size

    # Once cached, no network: an unreachable URL still returns the file.
    (folder / "sms.zip").unlink()
    assert hub.download_sms_spam(cache, url="http://127.0.0.1:9/unreachable.zip") == path
    assert [len(part) for part in parts(data.load_splits(cache_dir=cache))] == [1045, 149, 300]


@pytest.mark.parametrize(
    "member, content, expected",
    [
        ("SMSSpamCollection", b"ham\thello\nspam\twin\n", "sha256"),
        ("OtherFile", b"ham\thello\n", "no SMSSpamCollection"),
        (None, b"not a zip at all", "not a valid zip"),
    ],
)
def test_a_wrong_archive_is_an_error_and_nothing_is_cached(web_folder, tmp_path, member, content, expected):
    folder, base_url = web_folder
    if member is None:
        (folder / "sms.zip").write_bytes(content)
    else:
        with zipfile.ZipFile(folder / "sms.zip", "w") as archive:
            archive.writestr(member, content)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=expected):
        hub.download_sms_spam(cache, url=f"{base_url}/sms.zip")
    assert not (cache / "sms_spam" / "SMSSpamCollection").exists()
    assert list((cache / "sms_spam").iterdir()) == []


def test_an_unreachable_server_is_a_connection_error_and_nothing_is_cached(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        hub.download_sms_spam(cache, url="http://127.0.0.1:9/sms.zip")
    assert not (cache / "sms_spam" / "SMSSpamCollection").exists()


def test_the_default_cache_is_used_without_the_network(sms_spam_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CLASSIFICATION_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "SMS_SPAM_URL", "http://127.0.0.1:9/unreachable.zip")
    cached = tmp_path / "sms_spam" / "SMSSpamCollection"
    cached.parent.mkdir()
    cached.write_bytes(sms_spam_file.read_bytes())
    assert hub.download_sms_spam() == cached
    assert [len(part) for part in parts(data.load_splits())] == [1045, 149, 300]


def test_a_damaged_cached_copy_is_not_trusted(sms_spam_file, tmp_path, monkeypatch):
    """A cached file that is not the collection (cut short, or another file) is fetched again;
    offline that is a connection error, never a silently different data set."""
    monkeypatch.setenv("GPT2_CLASSIFICATION_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "SMS_SPAM_URL", "http://127.0.0.1:9/unreachable.zip")
    cached = tmp_path / "sms_spam" / "SMSSpamCollection"
    cached.parent.mkdir()
    cached.write_bytes(sms_spam_file.read_bytes()[:-100])
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        data.load_splits()


# --------------------------------------------------------------------------- long texts, tokenized in part


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(["word", " ", "  ", "\n", "\t", "42", "!!", "'s", "\u00a0", "é", "😀", " x",
                                        "<|endoftext|>", "a" * 30, " " * 9]), max_size=400),
       max_length=st.integers(1, 40), keep=st.sampled_from(["start", "end"]))
def test_a_long_text_tokenized_in_part_gives_the_tokens_of_the_whole(pieces, max_length, keep):
    tokenizer, text = data.get_tokenizer(), "".join(pieces)
    whole = data.encode(tokenizer, text)
    expected = whole[:max_length] if keep == "start" else whole[max(len(whole) - max_length, 0):]
    assert data.encode_within(tokenizer, text, max_length, keep) == expected


def test_a_huge_text_costs_what_its_kept_part_costs():
    tokenizer, calls = data.get_tokenizer(), []
    text = "free prize " * 3_000_000  # 33 MB
    original = tokenizer.encode
    tokenizer.encode = lambda part, **kwargs: calls.append(len(part)) or original(part, **kwargs)
    try:
        start, end = data.encode_within(tokenizer, text, 24), data.encode_within(tokenizer, text, 24, "end")
    finally:
        tokenizer.encode = original
    assert start == original(text[:200], disallowed_special=())[:24] and len(end) == 24
    assert max(calls) < 1000, "only a page of the text was tokenized"
