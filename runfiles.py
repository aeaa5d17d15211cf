"""A run folder's two files, written whole and read back checked: machinery behind
classify.save_classifier and classify.load_classifier.

- config.json: the classifier's settings (classify.ClassifierConfig), checked field by field when
  read (`check_fields`), since anyone may hand classify.py a folder;
- classifier.safetensors: the weights. All of them (`train.py --save full`, and every run from
  random weights, which nothing can find again), or only those training changed, beside the
  identity of the starting weights they complete (`weights_identity`): a preset's name or a
  local file or folder, and the sha256 of its files, checked when the folder is loaded
  (`find_weights`). gpt2-small's head alone then weighs kilobytes, last-block 28 MB, LoRA's
  adapters 5 MB, where the whole model weighs 500 MB.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gpt
import hfformat
import hub

CONFIG_FILE, WEIGHTS_FILE = "config.json", "classifier.safetensors"
FORMAT, FORMAT_VERSION = "gpt2-classifier", 1


def weights_identity(source: str, cache_dir: str | Path | None = None) -> dict[str, str]:
    """Where starting weights are found again and what they are: {"source": a preset's name or a
    local path, "sha256": of the files gpt.load_gpt2 reads there}."""
    path = hub.fetch(source, cache_dir)  # a preset: its file in the cache
    return {"source": str(source), "sha256": files_sha256(path)}


def find_weights(identity: dict[str, str]) -> str | Path:
    """The starting weights a folder of trained weights completes: found again where they were (a
    preset is downloaded again if the cache lost it) and checked to be the same, byte for byte."""
    source = identity["source"]
    try:
        path = hub.fetch(source, progress=hub.print_progress)
        found = files_sha256(path)
    except ValueError as error:
        raise ValueError(f"the starting weights this run was trained from, {source}, cannot be read ({error}); "
                         "put them back, or save runs whole: python train.py --save full") from None
    if found != identity["sha256"]:
        raise ValueError(f"the starting weights at {path} are not those this run was trained from (sha256 "
                         f"{found[:12]}..., expected {identity['sha256'][:12]}...); put the original ones back")
    return path


def files_sha256(path: str | Path) -> str:
    """The sha256 of a weights file, or of a folder's weight files (its shards, each in order)."""
    files = sorted({file for file, _ in gpt.read_headers(Path(path)).values()})
    if len(files) == 1:
        return hub.file_sha256(files[0])
    return hashlib.sha256("".join(hub.file_sha256(file) for file in files).encode("ascii")).hexdigest()


def check_fields(fields: object) -> dict:
    """A config.json's object, checked: ValueError (one line) for anything classify.ClassifierConfig
    could not be built from, or would build wrong (the pooling and max_length it checks itself)."""
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} config (its 'format' field is not {FORMAT!r})")
    if fields.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {gpt.quoted(fields.get('format_version'))}; "
                         f"this classify.py reads version {FORMAT_VERSION}")
    missing = {"gpt", "label_names", "pooling", "max_length", "tokenizer"} - fields.keys()
    if missing:
        raise ValueError(f"field {min(missing)!r} is missing")
    names, shape, base, lora = fields["label_names"], fields["gpt"], fields.get("base"), fields.get("lora")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names) == fields.get("num_classes")):
        raise ValueError(f"num_classes {gpt.quoted(fields.get('num_classes'))} and label_names {gpt.quoted(names)}: "
                         "need one distinct name per class, and at least 2 classes")
    if not isinstance(shape, dict) or not shape.keys() <= set(gpt.GPTConfig.__dataclass_fields__):
        raise ValueError(f"gpt {gpt.quoted(shape)}: expected an object with the fields of GPTConfig")
    if fields["tokenizer"] != "gpt2":
        raise ValueError(f"tokenizer {gpt.quoted(fields['tokenizer'])}: this classify.py reads gpt2's")
    if base is not None and not (isinstance(base, dict) and base.keys() == {"source", "sha256"}
                                 and all(isinstance(value, str) for value in base.values())):
        raise ValueError(f"base {gpt.quoted(base)}: expected the source and sha256 of the starting weights")
    if lora is not None and not (isinstance(lora, dict) and type(lora.get("rank")) is int and lora["rank"] >= 1
                                 and type(lora.get("alpha")) in (int, float) and lora.keys() == {"rank", "alpha"}):
        raise ValueError(f"lora {gpt.quoted(lora)}: expected a rank >= 1 and an alpha")
    return fields


def write(folder: str | Path, fields: dict, tensors: dict) -> None:
    """Both files, each written whole and renamed into place, the old config.json removed first:
    a crash leaves either the previous run or a folder `read` refuses as incomplete, never new
    weights beside an old config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    with hub.atomic_open(folder / WEIGHTS_FILE) as file:
        hfformat.write_safetensors(file, tensors, metadata={"format": FORMAT})
    with hub.atomic_open(folder / CONFIG_FILE) as file:
        file.write((json.dumps(fields, indent=2) + "\n").encode("utf-8"))


def read(folder: str | Path) -> tuple[dict, dict[str, gpt.TensorInfo], Path]:
    """config.json's fields (checked) and what classifier.safetensors holds (its header, checked):
    nothing is read beyond the header, nor built, before the caller checks the shapes."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a run folder" if folder.exists() else "does not exist"
        raise ValueError(f"run folder {folder} {what} (train one with: python train.py --out {folder})")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing: {folder} is not a complete saved classifier")
    try:
        fields = check_fields(gpt.read_json(config_path))
    except ValueError as error:
        raise ValueError(f"{config_path}: {' '.join(str(error).split())}") from None
    return fields, gpt.read_header(weights_path)[0], weights_path
