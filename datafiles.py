"""Reading labelled text files: the SMS format, CSV/TSV, encodings, the UCI zip.

Machinery behind step 1 of chapter 06's pipeline ("Texto rotulado"): `data.load_splits` calls
`read_labelled` once per file and gets back texts, their labels as indices, and the label names.
What the chapter teaches (balance, split) is in data.py; this file is about the files people have:

- the SMS Spam Collection's own format, one `ham<TAB>text` per line and no header (the UCI file);
- a CSV or TSV with a header row. The delimiter is the one among `,` `;` tab `|` that splits the
  header into the named columns, whatever the extension (Excel in Portuguese saves `.csv` files
  with `;`), unless `delimiter` names it;
- any text encoding (`encoding`, default UTF-8; a byte-order mark is dropped): Excel on Windows
  saves cp1252;
- a .zip: the UCI archive as downloaded (`SMSSpamCollection` and a readme), or a zip holding one
  data file beside an optional readme. A member is read no further than a size limit, so an
  archive that inflates to gigabytes costs no more memory than the limit.

Every problem with a file is a ValueError of one line naming the file, the line where known, and
the fix, in the words of train.py's flags (--data, --text-column, --label-column, --delimiter,
--encoding).
"""

from __future__ import annotations

import codecs
import csv
import io
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import hub

SMS_SPAM_LABELS = ["ham", "spam"]  # ham = 0, spam = 1, as in the book
DELIMITERS = {",": ",", ";": ";", "\t": "\t", "|": "|", "tab": "\t", "\\t": "\t"}  # what --delimiter takes
DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip
MAX_MEMBER_BYTES = 1 << 30  # the most read from a data file inside a zip (the UCI file: its own size)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
              zlib.error, ValueError)  # what zipfile raises for a damaged, encrypted or unsupported archive


class Rows(NamedTuple):
    """What a file holds: texts, their labels as indices into label_names, and those names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None, delimiter: str | None = None,
                  encoding: str = "utf-8") -> Rows:
    """Either format, plain or zipped: the SMS Spam Collection's `label<TAB>text`, or a CSV/TSV with
    a header row.

    Label names are the sorted distinct labels of a table (ham, spam for the SMS format), unless
    `label_names` fixes them: then any other label is an error, and the file may lack a class (a
    small validation or test file). Without it, the file needs two classes or more.
    """
    delimiter = check_delimiter(delimiter)
    check_encoding(encoding)
    if text_column == label_column:
        raise ValueError(f"--text-column and --label-column both name {text_column!r}; they must differ")
    raw, where = _read_bytes(Path(path))
    content = _decode(raw, where, encoding)
    if _is_sms_format(content):
        rows = _parse_sms_spam(where, content)
        if label_names is not None and label_names != rows.label_names:
            raise ValueError(f"{where}: the labels are {rows.label_names}, expected {label_names} (the training "
                             f"data's)")
    else:
        rows = _parse_table(where, content, text_column, label_column, label_names, delimiter)
    if label_names is None:
        present = sorted(set(rows.labels))
        if len(present) < 2:
            raise ValueError(f"{where}: every example has the label {rows.label_names[present[0]]!r}; a classifier "
                             f"needs two classes or more")
    return rows


def check_delimiter(delimiter: str | None) -> str | None:
    """The delimiter character --delimiter names (None: find it from the header)."""
    if delimiter is None:
        return None
    if not isinstance(delimiter, str) or delimiter not in DELIMITERS:
        raise ValueError(f"--delimiter {delimiter!r}: use one of , ; | or tab (or leave it out: the header tells)")
    return DELIMITERS[delimiter]


def check_encoding(encoding: str) -> None:
    """ValueError unless Python knows the encoding --encoding names."""
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ValueError(f"--encoding {encoding!r}: not an encoding Python knows; try utf-8, cp1252 or "
                         f"latin-1") from None


# --------------------------------------------------------------------------- bytes and text


def _read_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes (for a zip: its data member's) and the name errors give it."""
    where = hub.printable(str(path))
    if not path.exists():
        raise ValueError(f"{where}: no such file")
    if not path.is_file():
        raise ValueError(f"{where}: not a file")
    try:
        with path.open("rb") as file:
            is_zip = file.read(4) in ZIP_SIGNATURES or path.suffix.lower() == ".zip"
        if is_zip:
            return _unzip(path, where)
        return path.read_bytes(), where
    except OSError as error:
        raise ValueError(f"{where}: cannot read it ({hub.printable(error.strerror or str(error))})") from None


def _unzip(path: Path, where: str) -> tuple[bytes, str]:
    """The data file inside a zip (`_data_member`), read no further than its limit: the UCI file's
    own size for SMSSpamCollection, MAX_MEMBER_BYTES for another."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
            member = _data_member(names)
            limit = hub.SMS_SPAM_SIZE if Path(member or "").name == hub.SMS_SPAM_MEMBER else MAX_MEMBER_BYTES
            if member is not None:
                with archive.open(member) as file:
                    content = file.read(limit + 1)
    except ZIP_ERRORS as error:
        raise ValueError(f"{where}: not a zip archive this reader can open ({hub.printable(str(error))}); unzip "
                         f"it and pass the file with --data") from None
    if member is None:
        raise ValueError(f"{where}: a zip must hold {hub.SMS_SPAM_MEMBER} or one data file (and maybe a readme), "
                         f"this one holds {hub.printable(str(names[:10]))}; unzip it and pass the file with --data")
    where = f"{where}, file {hub.printable(member)}"
    if len(content) > limit:
        raise ValueError(f"{where}: larger than {limit:,} bytes, the most read from inside a zip"
                         f"{' (the UCI file has exactly that many)' if limit == hub.SMS_SPAM_SIZE else ''}; "
                         f"unzip it and pass the file with --data")
    return content, where


def _data_member(names: list[str]) -> str | None:
    """SMSSpamCollection (the UCI archive), else the one member that is not a readme; the clutter
    macOS adds (__MACOSX/, .DS_Store) is not data. None when no single member is the data."""
    names = [name for name in names if not name.startswith("__MACOSX/") and not Path(name).name.startswith(".")]
    sms = [name for name in names if Path(name).name == hub.SMS_SPAM_MEMBER]
    others = [name for name in names if not Path(name).name.lower().startswith("readme")]
    return sms[0] if sms else others[0] if len(others) == 1 else None


def _decode(raw: bytes, where: str, encoding: str) -> str:
    """The text of the file; a leading byte-order mark is dropped. ValueError when it does not
    decode (naming the line and byte) or is blank."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line_number = raw[: error.start].count(b"\n") + 1
        if codecs.lookup(encoding).name == "utf-8":
            name, fix = "UTF-8", "if it was saved by Excel, try --encoding cp1252"
        else:
            name = hub.printable(encoding)
            fix = "choose the file's own --encoding (utf-8 is the usual one; latin-1 reads any byte)"
        raise ValueError(f"{where}, line {line_number}: not {name} (byte {raw[error.start]:#04x}); {fix}") from None
    except LookupError:  # a codec that is not a text encoding, such as rot13
        raise ValueError(f"--encoding {encoding!r}: not a text encoding; try utf-8, cp1252 or latin-1") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"{where}: the file is empty")
    return text


# --------------------------------------------------------------------------- the SMS Spam Collection


def _is_sms_format(content: str) -> bool:
    """True for a headerless `ham|spam<TAB>text` file like the UCI original, whatever its name: a
    table's first line is its header, which names columns, not classes."""
    first_line = next(line for line in content.split("\n") if line.strip())  # content is not blank
    return first_line.partition("\t")[0] in SMS_SPAM_LABELS


def _parse_sms_spam(where: str, content: str) -> Rows:
    """One `label<TAB>text` per line, labels ham/spam. Blank lines are skipped; any other line
    that does not fit is an error naming it, never a silent drop."""
    texts, labels = [], []
    for line_number, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")  # a file saved with CRLF line endings
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise ValueError(f"{where}, line {line_number}: no tab; each line must be label<TAB>text")
        if label not in SMS_SPAM_LABELS:
            raise ValueError(f"{where}, line {line_number}: unknown label {label!r}; the labels are "
                             f"{', '.join(SMS_SPAM_LABELS)} (for other labels use a CSV/TSV file with a header)")
        if not text.strip():
            raise ValueError(f"{where}, line {line_number}: the text after the tab is empty")
        texts.append(text)
        labels.append(SMS_SPAM_LABELS.index(label))
    return Rows(texts, labels, list(SMS_SPAM_LABELS))


# --------------------------------------------------------------------------- CSV and TSV


def _parse_table(where: str, content: str, text_column: str, label_column: str, label_names: list[str] | None,
                 delimiter: str | None) -> Rows:
    """A header row, then one example per row; quoted fields may hold the delimiter and line breaks."""
    if label_names is not None and (len(set(label_names)) != len(label_names) or len(label_names) < 2):
        raise ValueError(f"label_names {label_names}: need two or more distinct names")
    delimiter = delimiter or _find_delimiter(content, (text_column, label_column))
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    rows = _csv_rows(reader, where)
    header = [name.strip() for name in next(rows)]
    for column in (text_column, label_column):
        if column not in header:
            one = len(header) == 1  # perhaps split at the wrong delimiter
            raise ValueError(f"{where}, line 1: no column {column!r}; the columns are {header[:20]}"
                             f"{f' (split at {DELIMITER_NAMES[delimiter]})' if one else ''}; choose them with "
                             f"--text-column and --label-column{', and the delimiter with --delimiter' if one else ''} "
                             f"(a file without a header must be in the SMS format, ham|spam<TAB>text)")
    text_index, label_index = header.index(text_column), header.index(label_column)

    texts, label_strings = [], []
    for row in rows:
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(f"{where}, line {reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                             f"quote fields that contain the delimiter ({DELIMITER_NAMES[delimiter]}), or choose "
                             f"another with --delimiter")
        text, label = row[text_index], row[label_index].strip()
        if not text.strip():
            raise ValueError(f"{where}, line {reader.line_num}: the {text_column!r} field is empty")
        if not label:
            raise ValueError(f"{where}, line {reader.line_num}: the {label_column!r} field is empty")
        if label_names is not None and label not in label_names:
            raise ValueError(f"{where}, line {reader.line_num}: unknown label {label!r}; the labels are "
                             f"{label_names} (the training data's)")
        texts.append(text)
        label_strings.append(label)
    if not texts:
        raise ValueError(f"{where}: the file has a header but no examples")
    names = sorted(set(label_strings)) if label_names is None else list(label_names)
    index = {name: k for k, name in enumerate(names)}
    return Rows(texts, [index[label] for label in label_strings], names)


def _find_delimiter(content: str, columns: tuple[str, str]) -> str:
    """The delimiter that splits the header into fields holding both named columns; when none
    does, the one that splits it into the most fields (so the error lists real columns)."""
    headers = {}
    for delimiter in DELIMITER_NAMES:
        try:
            header = next(csv.reader(io.StringIO(content[:65536], newline=""), delimiter=delimiter), [])
        except csv.Error:  # the real parse reports it, with the line
            header = []
        headers[delimiter] = [name.strip() for name in header]
        if all(column in headers[delimiter] for column in columns):
            return delimiter
    return max(headers, key=lambda delimiter: len(headers[delimiter]))


def _csv_rows(reader, where: str):
    """The reader's rows; the csv module's own errors (a field longer than its limit of 131,072
    characters, a NUL byte) become a ValueError naming the line."""
    try:
        yield from reader
    except csv.Error as error:
        raise ValueError(f"{where}, line {reader.line_num}: {hub.printable(str(error))}") from None
