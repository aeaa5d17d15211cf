"""Labelled text in, batches of token ids out: steps 1 and 2 of chapter 06's pipeline
(section "Pipeline de treinamento para classificação").

Step 1, "Texto rotulado": texts and their classes, in `LabelledTexts`. The book's data set is the
SMS Spam Collection (UCI dataset 228; Almeida & Hidalgo, 2011; CC BY 4.0), prepared as the book
does: balance by undersampling `ham` to the 747 spam messages, shuffle with a seed, split 70/10/20
into 1,045 / 149 / 300 messages (`book_splits`). A CSV/TSV of your own works too, with a
stratified split for unbalanced data. `load_splits` does the whole step from a path.

Duplicates: the SMS file repeats texts (5,574 lines, 5,160 distinct texts), so a split puts some copies
in training and others in test, where the classifier is scored on texts it memorised.
`seen_in` finds them; `load_splits(dedup=True)` (--dedup) drops every repeat before balancing
and splitting. Two texts are duplicates when they are equal after Unicode NFC normalisation and
stripping surrounding whitespace (`duplicate_key`): case, inner spacing and punctuation count.

Step 2, "Tokenização": GPT-2's byte-pair encoding (tiktoken) turns each text into token ids, and
a `ClassificationDataset` holds (token ids, label) pairs. Batches: `collate` pads each batch to
its own longest text, keeping the real lengths so the classifier can find each text's last real
token, and `bucket_batches` groups texts of similar length so that padding stays small.
(The book pads every text to the longest training text; `collate(..., pad_to=...)` does that.)

All randomness comes from a `torch.Generator` seeded by the caller: the same seed gives the same
splits on every machine. Reading files (formats, encodings, zips) is datafiles.py's job;
downloading the SMS file is hub.py's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

import datafiles
import hub

END_OF_TEXT_ID = 50256  # <|endoftext|>, GPT-2's one special token, and its last: 50,257 tokens in all
PAD_TOKEN_ID = END_OF_TEXT_ID  # the book pads with it too: `lengths` say where each text ends
SMS_SPAM_LABELS = datafiles.SMS_SPAM_LABELS  # ham = 0, spam = 1, as in the book
BOOK_FRACTIONS = (0.7, 0.1, 0.2)  # train, validation, test


# --------------------------------------------------------------------------- step 1: labelled text


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

    dropped: int = 0  # repeated texts --dedup dropped before balancing and splitting

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


def duplicate_key(text: str) -> str:
    """What makes two texts duplicates: equal after Unicode NFC normalisation (the same characters,
    however composed) and stripping surrounding whitespace. The SMS file holds spam copies that
    differ by a trailing space alone."""
    return unicodedata.normalize("NFC", text).strip()


def seen_in(texts: Sequence[str], reference: Sequence[str]) -> list[bool]:
    """For each text, whether a duplicate of it is in `reference` (the training texts)."""
    known = {duplicate_key(text) for text in reference}
    return [duplicate_key(text) in known for text in texts]


def drop_duplicates(parts: list[LabelledTexts]) -> list[LabelledTexts]:
    """Each text's first occurrence across `parts`, in order (its first label, should copies
    disagree): no text twice within a part, none in two parts."""
    known: set[str] = set()
    kept = []
    for part in parts:
        first = []
        for i, key in enumerate(map(duplicate_key, part.texts)):
            if key not in known:
                known.add(key)
                first.append(i)
        kept.append(part.subset(first))
    return kept


def class_weights(data: LabelledTexts) -> torch.Tensor:
    """--class-weights balanced: each class weighted by the inverse of its frequency in `data`
    (the training split), n / (K * count_k), as scikit-learn's "balanced", so that every class
    carries the same total weight, n / K, and the majority no longer dominates the loss. A class
    absent from `data` weighs 0 (no text carries it). (K,) float32."""
    counts = torch.tensor(data.class_counts(), dtype=torch.float32)  # (K,)
    return torch.where(counts > 0, len(data) / (len(counts) * counts), torch.zeros_like(counts))


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
                progress: hub.Progress | None = None, delimiter: str | None = None,
                encoding: str = "utf-8", dedup: bool = False) -> Splits:
    """Train, validation and test data from a path (or the SMS Spam Collection when path is None).

    One file: balanced=True is the book's preparation (`book_splits`); balanced=False a
    stratified 70/10/20 split of all the data. With validation_path and test_path the three
    files are used as given, except that balanced=True undersamples the training file.

    A file is the SMS format (`ham<TAB>text` lines, no header) or a CSV/TSV with a header row
    whose columns text_column and label_column hold the text and the class; either may come
    zipped (the UCI archive as downloaded works). delimiter: None finds it from the header among
    ",", ";", tab and "|"; one of those (or "tab") forces it. encoding: the files' text encoding
    (default "utf-8"; Excel on Windows saves "cp1252"). Too little data is refused: every split
    needs one text or more and training needs two classes. Any problem is a ValueError of one
    line naming the file (and line) and the fix. dedup=True first drops every repeated text
    (`drop_duplicates`; with separate files, validation and test also lose the texts of the
    training file), so that no text is in two splits.
    """
    if (validation_path is None) != (test_path is None):
        raise ValueError("give both --validation-data and --test-data, or neither (to split --data 70/10/20)")
    path = hub.download_sms_spam(cache_dir, progress) if path is None else Path(path)
    options = dict(delimiter=delimiter, encoding=encoding)
    data = read_labelled(path, text_column, label_column, **options)
    if validation_path is None:
        unique = drop_duplicates([data])[0] if dedup else data
        splits = book_splits(unique, seed) if balanced else split(unique, seed, BOOK_FRACTIONS, stratify=True)
        _check_enough(splits, unique, hub.printable(str(path)), balanced)
        splits.dropped = len(data) - len(unique)
        return splits
    parts = [data, *(read_labelled(p, text_column, label_column, data.label_names, **options)
                     for p in (validation_path, test_path))]
    unique = drop_duplicates(parts) if dedup else parts
    for flag, part in zip(("--validation-data", "--test-data"), unique[1:]):
        if dedup and not len(part):
            raise ValueError(f"--dedup: every text of {flag} is also in an earlier file; nothing is left to evaluate")
    return Splits(balance(unique[0], seed) if balanced else unique[0], *unique[1:],
                  dropped=sum(map(len, parts)) - sum(map(len, unique)))


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None, *, delimiter: str | None = None,
                  encoding: str = "utf-8") -> LabelledTexts:
    """One file of labelled text, in either format, plain or zipped (datafiles.read_labelled).
    label_names fixes the classes (a validation or test file takes the training file's)."""
    return LabelledTexts(*datafiles.read_labelled(path, text_column, label_column, label_names, delimiter, encoding))


def _check_enough(splits: Splits, data: LabelledTexts, where: str, balanced: bool) -> None:
    """Every split needs a text or more, and training two classes; else say how far the data is."""
    sizes = [len(splits.train), len(splits.validation), len(splits.test)]
    if min(sizes) > 0 and len(set(splits.train.labels)) >= 2:
        return
    cut = f"{' / '.join(map(str, sizes))}; each split needs one text or more and training two classes"
    if balanced:
        cut += ", so 10 texts or more in all"  # the book's cut gives validation int(0.1 N) texts
    counts = data.class_counts()
    if balanced and sum(sizes) < len(data):
        smallest = min(counts)
        raise ValueError(f"{where}: too few texts: balancing undersamples every class to the smallest, "
                         f"{data.label_names[counts.index(smallest)]!r}, which has {_texts(smallest)}: "
                         f"{_texts(sum(sizes))} in all, too few to split 70/10/20 ({cut}); add texts or use "
                         f"--no-balanced")
    raise ValueError(f"{where}: too few texts: {_texts(len(data))} would split 70/10/20 into {cut}; add texts")


def _texts(count: int) -> str:
    return f"{count} text" if count == 1 else f"{count} texts"


# --------------------------------------------------------------------------- step 2: tokenization


def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding (tiktoken), built from the BPE files the repository ships in
    gpt2_bpe/ (`hub.gpt2_tokenizer`): tokenizing never needs the network."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; this project reads GPT-2's, 'gpt2'")
    return hub.gpt2_tokenizer()


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of `text`. A literal "<|endoftext|>" in the text is ordinary text, not token 50256."""
    return tokenizer.encode(text, disallowed_special=())


def encode_within(tokenizer: tiktoken.Encoding, text: str, max_length: int, keep: str = "start") -> list[int]:
    """`encode(text)[:max_length]` (keep "start") or its last max_length ids ("end"), tokenizing only
    that part of a long text: a 60 MB text costs what a page does. Exact: the text is cut only
    before a space that precedes a non-space, where GPT-2's pre-tokenizer always starts a new
    piece, so every piece on the kept side is split as in the whole text."""
    reach = 8 * max_length + 64  # characters: a token is rarely longer than 8
    while reach < len(text):
        cut = _piece_start(text, reach if keep == "start" else len(text) - reach, keep == "start")
        if cut is None:
            break
        ids = encode(tokenizer, text[:cut] if keep == "start" else text[cut:])
        if len(ids) >= max_length:
            return ids[:max_length] if keep == "start" else ids[len(ids) - max_length :]
        reach *= 2
    ids = encode(tokenizer, text)
    return ids[:max_length] if keep == "start" else ids[max(len(ids) - max_length, 0) :]


def _piece_start(text: str, position: int, forward: bool) -> int | None:
    """The first (forward) or last position from `position` holding a space followed by a non-space."""
    while 0 <= position < len(text) - 1:
        if text[position] == " " and not text[position + 1].isspace():
            return position
        position += 1 if forward else -1
    return None


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
class TokenizedSplits:
    """Step 2's output: token ids and labels of each split, all cut to `max_length` tokens, and
    the labelled texts they came from."""

    train: ClassificationDataset
    validation: ClassificationDataset
    test: ClassificationDataset
    max_length: int
    texts: Splits | None = None

    def items(self) -> list[tuple[str, ClassificationDataset]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def tokenize(splits: Splits, max_length: int | None, limit: int) -> TokenizedSplits:
    """Step 2 for the three splits: GPT-2's token ids of every text. Without `max_length` the
    longest training text sets it (as in the book), but never beyond `limit`, what the model
    reads; validation and test texts are cut to the same length."""
    tokenizer = get_tokenizer("gpt2")
    train = ClassificationDataset.from_texts(splits.train, tokenizer, max_length or limit)
    max_length = max_length or max(train.lengths)
    validation = ClassificationDataset.from_texts(splits.validation, tokenizer, max_length)
    test = ClassificationDataset.from_texts(splits.test, tokenizer, max_length)
    return TokenizedSplits(train, validation, test, max_length, splits)


# --------------------------------------------------------------------------- batches


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


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int | None = None, epoch: int = 0,
                   window: int = 100) -> list[list[int]]:
    """Batches of indices whose texts have similar lengths, so that padding each batch to its own
    longest text adds little.

    With a seed (training): shuffle every index, sort them by length within windows of `window`
    batches, cut each window into batches, then shuffle the batches. Which texts share a window,
    and the batch order, change every epoch, while a batch's texts stay close in length; the
    order depends on (seed, epoch) alone. Without one (evaluation, inference): the batches in
    order of length. Every index appears exactly once (a window holds whole batches: only the
    last batch can be short).
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size {batch_size} and window {window}: both must be at least 1")
    if seed is None:
        return _cut(sorted(range(len(lengths)), key=lambda i: lengths[i]), batch_size)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window_size = window * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window_size):  # sorted() is stable: equal lengths keep their random order
        batches += _cut(sorted(order[start : start + window_size], key=lambda i: lengths[i]), batch_size)
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def _cut(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
