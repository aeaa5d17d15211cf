"""Labelled text in, batches of token ids out: steps 1 and 2 of chapter 06's pipeline
(section "Pipeline de treinamento para classificação").

Step 1, "Texto rotulado": texts and their classes, in `LabelledTexts`. The book's data set is the
SMS Spam Collection (UCI dataset 228; Almeida & Hidalgo, 2011; CC BY 4.0), prepared as the book
does: balance by undersampling `ham` to the 747 spam messages, shuffle with a seed, split 70/10/20
into 1,045 / 149 / 300 messages (`book_splits`). A CSV/TSV of your own works too, with a
stratified split for unbalanced data.

Step 2, "Tokenização": GPT-2's byte-pair encoding (tiktoken) turns each text into token ids, a
`ClassificationDataset` holds (token ids, label) pairs, and `collate` pads each batch to its own
longest text, keeping the real lengths so the classifier can find each text's last real token.
(The book pads every text to the longest training text; `collate(..., pad_to=...)` does that.)

All randomness comes from a `torch.Generator` seeded by the caller: the same seed gives the same
splits on every machine. Downloading the SMS file is hub.py's job.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

import hub

END_OF_TEXT_ID = 50256  # <|endoftext|>, GPT-2's one special token, and its last: 50,257 tokens in all
PAD_TOKEN_ID = END_OF_TEXT_ID  # the book pads with it too: `lengths` say where each text ends
SMS_SPAM_LABELS = ["ham", "spam"]  # ham = 0, spam = 1, as in the book
BOOK_FRACTIONS = (0.7, 0.1, 0.2)  # train, validation, test


# --------------------------------------------------------------------------- labelled text


@dataclass
class LabelledTexts:
    """Texts and their classes; `labels[i]` indexes `label_names`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [label for label in self.labels if not 0 <= label < len(self.label_names)]
        if bad:
            raise ValueError(f"label {bad[0]} is not an index into label_names {self.label_names}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The examples at `indices`, in that order, with the same label names."""
        texts, labels = [self.texts[i] for i in indices], [self.labels[i] for i in indices]
        return LabelledTexts(texts, labels, list(self.label_names))

    def class_counts(self) -> list[int]:
        """How many examples each class has, in label_names order."""
        counts = [0] * len(self.label_names)
        for label in self.labels:
            counts[label] += 1
        return counts


@dataclass
class Splits:
    """The three data sets of supervised learning: fit on train, choose on validation, report test."""

    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


# --------------------------------------------------------------------------- the SMS Spam Collection


def read_sms_spam(path: str | Path) -> LabelledTexts:
    """The SMS Spam Collection's format: one `label<TAB>text` per line, no header, labels ham/spam.

    Blank lines are skipped; any other line that does not fit the format is an error naming
    the file and line, never a silent drop.
    """
    path = Path(path)
    data = _parse_sms_spam(path, _read_text(path))
    _require_two_classes(data, path)
    return data


def _parse_sms_spam(path: Path, content: str) -> LabelledTexts:
    texts, labels = [], []
    for line_number, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")  # a file saved with CRLF line endings
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise ValueError(f"{path}, line {line_number}: no tab; each line must be label<TAB>text")
        if label not in SMS_SPAM_LABELS:
            raise ValueError(
                f"{path}, line {line_number}: unknown label {label!r}; the labels are "
                f"{', '.join(SMS_SPAM_LABELS)} (for other labels use a CSV/TSV file with a header)"
            )
        if not text.strip():
            raise ValueError(f"{path}, line {line_number}: the text after the tab is empty")
        texts.append(text)
        labels.append(SMS_SPAM_LABELS.index(label))
    return LabelledTexts(texts, labels, list(SMS_SPAM_LABELS))


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (a leading byte-order mark is dropped); ValueError when it is not there,
    not UTF-8 or empty."""
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line_number}: not UTF-8 (byte {raw[error.start]:#04x}); save the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return text


def _require_two_classes(data: LabelledTexts, path: Path) -> None:
    present = [name for name, count in zip(data.label_names, data.class_counts()) if count]
    if len(present) < 2:
        raise ValueError(
            f"{path}: every example has the label {present[0]!r}; a classifier needs two classes or more"
        )


# --------------------------------------------------------------------------- your own data


def read_table(path: str | Path, text_column: str = "text", label_column: str = "label",
               label_names: list[str] | None = None) -> LabelledTexts:
    """A CSV or TSV file with a header row; texts and labels from the named columns.

    The delimiter follows the extension (.tsv tab, .csv comma) or is guessed from the file.
    Quoted fields may hold the delimiter and line breaks. Label names are the sorted distinct
    labels, unless `label_names` fixes them (then any other label is an error): either way
    the order is stable, and it is saved with the model.
    """
    path = Path(path)
    return _parse_table(path, _read_text(path), text_column, label_column, label_names)


def _parse_table(path: Path, content: str, text_column: str, label_column: str,
                 label_names: list[str] | None) -> LabelledTexts:
    if label_names is not None and (len(set(label_names)) != len(label_names) or len(label_names) < 2):
        raise ValueError(f"label_names {label_names}: need two or more distinct names")
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=_delimiter(path, content))
    rows = _csv_rows(reader, path)
    header = [name.strip() for name in next(rows)]
    columns = []
    for column in (text_column, label_column):
        if column not in header:
            raise ValueError(f"{path}, line 1: no column {column!r}; the columns are {header[:20]} (choose them "
                             f"with text_column= and label_column=; a file without a header must be in the SMS "
                             f"format, ham|spam<TAB>text)")
        columns.append(header.index(column))
    text_index, label_index = columns

    texts, label_strings = [], []
    for row in rows:
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                f"quote fields that contain the delimiter"
            )
        text, label = row[text_index], row[label_index].strip()
        if not text.strip():
            raise ValueError(f"{path}, line {reader.line_num}: the {text_column!r} field is empty")
        if not label:
            raise ValueError(f"{path}, line {reader.line_num}: the {label_column!r} field is empty")
        if label_names is not None and label not in label_names:
            raise ValueError(
                f"{path}, line {reader.line_num}: unknown label {label!r}; the labels are {label_names}"
            )
        texts.append(text)
        label_strings.append(label)
    if not texts:
        raise ValueError(f"{path}: the file has a header but no examples")
    names = sorted(set(label_strings)) if label_names is None else list(label_names)
    index = {name: i for i, name in enumerate(names)}
    data = LabelledTexts(texts, [index[label] for label in label_strings], names)
    if label_names is None:
        _require_two_classes(data, path)  # (given names: a small test file may lack a class)
    return data


def _csv_rows(reader, path: Path):
    """The reader's rows; the csv module's own errors (a field longer than its limit of 131,072
    characters, a NUL byte) become a ValueError naming the line."""
    try:
        yield from reader
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: {error}") from None


def _delimiter(path: Path, content: str) -> str:
    """Tab for .tsv, comma for .csv, otherwise guessed from the first lines."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(content[:65536], delimiters=",\t;|").delimiter
    except csv.Error:
        raise ValueError(f"{path}: cannot tell the delimiter; name the file .csv or .tsv") from None


def _is_sms_format(path: Path, content: str) -> bool:
    """True for a headerless `ham|spam<TAB>text` file like the UCI original (not .csv/.tsv)."""
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        return False
    first_line = next(line for line in content.split("\n") if line.strip())  # content is not blank
    return first_line.partition("\t")[0] in SMS_SPAM_LABELS


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None) -> LabelledTexts:
    """Either format: the SMS Spam Collection's `label<TAB>text`, or a CSV/TSV with a header."""
    path = Path(path)
    content = _read_text(path)
    if not _is_sms_format(path, content):
        return _parse_table(path, content, text_column, label_column, label_names)
    data = _parse_sms_spam(path, content)
    if label_names is None:
        _require_two_classes(data, path)  # (given names: a small test file may lack a class)
    elif label_names != data.label_names:
        raise ValueError(f"{path}: the labels are {data.label_names}, expected {label_names}")
    return data


# --------------------------------------------------------------------------- balance and split


def balance(data: LabelledTexts, seed: int) -> LabelledTexts:
    """Undersample every class to the size of the smallest one (the book keeps 747 of 4,827 ham).

    The smallest class keeps every example; the others keep a random sample. Examples stay in
    their original order (`book_splits` shuffles afterwards).
    """
    counts = data.class_counts()
    smallest = min(counts)
    if smallest == 0:
        empty = data.label_names[counts.index(0)]
        raise ValueError(f"class {empty!r} has no examples, so balancing would leave nothing")
    generator = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    for label in range(len(data.label_names)):
        members = [i for i, y in enumerate(data.labels) if y == label]
        if len(members) > smallest:
            chosen = torch.randperm(len(members), generator=generator)[:smallest]  # (smallest,)
            members = [members[i] for i in chosen.tolist()]
        kept.extend(members)
    return data.subset(sorted(kept))


def split(data: LabelledTexts, seed: int, fractions: tuple[float, float, float] = BOOK_FRACTIONS,
          stratify: bool = True) -> Splits:
    """Shuffle (seeded) and cut into train / validation / test.

    stratify=False is the book's cut: train = int(0.7 N), validation = int(0.1 N), test =
    the rest. stratify=True cuts each class by the same fractions (rounded so each class's
    parts add up to the class), so every split keeps the data's class proportions; that is
    the realistic setting for unbalanced data, where accuracy alone misleads.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions {fractions}: need three non-negative numbers (train, validation, test) summing to 1"
        )
    generator = torch.Generator().manual_seed(seed)
    if not stratify:
        order = torch.randperm(len(data), generator=generator).tolist()
        train_end = _floor(fractions[0] * len(data))
        validation_end = train_end + _floor(fractions[1] * len(data))
        parts = [order[:train_end], order[train_end:validation_end], order[validation_end:]]
    else:
        parts = [[], [], []]
        for label in range(len(data.label_names)):
            members = [i for i, y in enumerate(data.labels) if y == label]
            members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            # Cut at rounded cumulative fractions: each part is within one example of its share.
            train_end = _floor(fractions[0] * len(members) + 0.5)
            validation_end = _floor((fractions[0] + fractions[1]) * len(members) + 0.5)
            parts[0] += members[:train_end]
            parts[1] += members[train_end:validation_end]
            parts[2] += members[validation_end:]
        # Mix the classes, so a split is not all of one class followed by all of the next.
        parts = [[part[i] for i in torch.randperm(len(part), generator=generator).tolist()] for part in parts]
    train, validation, test = (data.subset(part) for part in parts)
    return Splits(train, validation, test)


def _floor(x: float) -> int:
    """int(x), forgiving floating-point error just below a whole number (0.7 * 30 = 20.999...)."""
    return int(x + 1e-9)


def book_splits(data: LabelledTexts, seed: int = 123) -> Splits:
    """The book's preparation: balance, shuffle, 70/10/20 (SMS: 1,045 / 149 / 300)."""
    return split(balance(data, seed), seed, BOOK_FRACTIONS, stratify=False)


def load_splits(path: str | Path | None = None, *, seed: int = 123, balanced: bool = True, text_column: str = "text",
                label_column: str = "label", validation_path: str | Path | None = None,
                test_path: str | Path | None = None, cache_dir: str | Path | None = None,
                progress: hub.Progress | None = None) -> Splits:
    """Train, validation and test data from a path (or the SMS Spam Collection when path is None).

    One file: balanced=True is the book's preparation (`book_splits`); balanced=False a
    stratified 70/10/20 split of all the data. With validation_path and test_path the three
    files are used as given, except that balanced=True undersamples the training file.
    """
    path = hub.download_sms_spam(cache_dir, progress) if path is None else Path(path)
    data = read_labelled(path, text_column, label_column)
    if validation_path is None and test_path is None:
        return book_splits(data, seed) if balanced else split(data, seed, BOOK_FRACTIONS, stratify=True)
    if validation_path is None or test_path is None:
        raise ValueError("give both validation_path and test_path, or neither (to split one file)")
    validation = read_labelled(validation_path, text_column, label_column, data.label_names)
    test = read_labelled(test_path, text_column, label_column, data.label_names)
    return Splits(balance(data, seed) if balanced else data, validation, test)


# --------------------------------------------------------------------------- tokenization


def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding (tiktoken), built from the BPE files the repository ships in
    gpt2_bpe/ (`hub.gpt2_tokenizer`): tokenizing never needs the network."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; this project reads GPT-2's, 'gpt2'")
    return hub.gpt2_tokenizer()


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of `text`. A literal "<|endoftext|>" in the text is ordinary text, not token 50256."""
    return tokenizer.encode(text, disallowed_special=())


class ClassificationDataset(torch.utils.data.Dataset):
    """(token ids, label) pairs, unpadded: padding happens per batch in `collate`."""

    def __init__(self, token_ids: list[list[int]], labels: list[int]) -> None:
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} token sequences but {len(labels)} labels")
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"example {empty[0]} has no tokens; every text needs at least one")
        self.token_ids = [list(ids) for ids in token_ids]
        self.labels = list(labels)
        self.lengths = [len(ids) for ids in self.token_ids]
        self.num_truncated = 0  # set by from_texts

    @classmethod
    def from_texts(
        cls, data: LabelledTexts, tokenizer: tiktoken.Encoding, max_length: int | None = None
    ) -> ClassificationDataset:
        """Tokenize every text, cutting those longer than max_length (None: the longest text's
        length, so nothing is cut). `num_truncated` says how many texts were cut."""
        token_ids = [encode(tokenizer, text) for text in data.texts]
        if max_length is None:
            max_length = max((len(ids) for ids in token_ids), default=1)
        if max_length < 1:
            raise ValueError(f"max_length {max_length}: must be at least 1")
        dataset = cls([ids[:max_length] for ids in token_ids], data.labels)
        dataset.num_truncated = sum(len(ids) > max_length for ids in token_ids)
        return dataset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.token_ids[index], self.labels[index]


@dataclass
class Batch:
    """A padded batch. `lengths` are the real lengths: token_ids[b, lengths[b]:] is padding."""

    token_ids: torch.Tensor  # (B, T) long
    lengths: torch.Tensor  # (B,) long
    labels: torch.Tensor  # (B,) long

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.token_ids.to(device), self.lengths.to(device), self.labels.to(device))


def collate(examples: list[tuple[list[int], int]], pad_to: int | None = None, pad_id: int = PAD_TOKEN_ID) -> Batch:
    """Pad a batch to its own longest text (dynamic padding), or to `pad_to` (the book's
    fixed padding to the longest training example)."""
    if not examples:
        raise ValueError("collate: the batch is empty")
    lengths = [len(ids) for ids, _ in examples]
    if min(lengths) == 0:
        raise ValueError(f"collate: example {lengths.index(0)} has no tokens")
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(
            f"pad_to {pad_to} is shorter than the batch's longest text ({max(lengths)} tokens); "
            f"truncate the texts first (ClassificationDataset.from_texts max_length)"
        )
    padded = [ids + [pad_id] * (width - len(ids)) for ids, _ in examples]
    return Batch(
        token_ids=torch.tensor(padded, dtype=torch.long),  # (B, T)
        lengths=torch.tensor(lengths, dtype=torch.long),  # (B,)
        labels=torch.tensor([label for _, label in examples], dtype=torch.long),  # (B,)
    )
