"""notebook.ipynb, the chapter walked cell by cell: committed without outputs, in the chapter's order,
and running top to bottom. Every code cell runs in order, in one namespace, as plain Python (the
.ipynb is JSON: no Jupyter needed), offline, in the notebook's "rapido" mode (a tiny GPT with random
weights) on a slice of the SMS data, through the hooks the notebook documents for tests and for
readers without network: NOTEBOOK_MODO, SMS_SPAM_FILE and NOTEBOOK_MENSAGENS.
"""

import importlib.util
import json
import math
import re
import socket
from pathlib import Path

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebook.ipynb"
SMS_MESSAGES = 200  # the first 200 lines: 33 spam, a balanced split of 46 / 6 / 14 texts

# The chapter's section headings, in its order (capitulo-06.md), from "O que é Fine-Tuning" on.
CHAPTER_HEADINGS = [
    "O que é Fine-Tuning",
    "Pré-Treinamento vs Especialização",
    "Transformando um modelo generativo em classificador",
    "Extraindo representações do modelo",
    "Classification Head",
    "Como escolher a representação do texto",
    "Estratégias de Fine-Tuning",
    "Fine-Tuning Completo",
    "Congelamento de Camadas",
    "Treinamento Supervisionado",
    "Pipeline de treinamento para classificação",
    "Avaliando classificadores de texto",
    "Accuracy",
    "Precision",
    "Recall",
    "F1-score",
    "Confusion Matrix",
    "Inferência e uso prático do modelo",
    "Limitações do Fine-Tuning Didático",
    "O que construiremos no notebook",
    "Preparando os próximos capítulos",
]


def read_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_the_notebook_is_nbformat_4_and_committed_without_outputs():
    notebook = read_notebook()
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 4
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell.get("id") for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    for index, cell in enumerate(notebook["cells"]):
        where = f"cell {index} ({cell.get('id')})"
        assert cell["cell_type"] in ("markdown", "code"), where
        assert isinstance(cell["metadata"], dict), where
        assert isinstance(cell["source"], (str, list)), where
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell["id"]), where
        assert source(cell).strip(), f"{where} is empty"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{where} has outputs: clear them before committing"
            assert cell["execution_count"] is None, f"{where} has an execution count: clear it before committing"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, where


def test_the_first_cell_sets_up_colab_and_names_no_made_up_repository():
    first = read_notebook()["cells"][0]
    assert first["cell_type"] == "code"
    text = source(first)
    assert re.search(r'^REPOSITORIO = ""', text, re.MULTILINE), "the reader sets the repository's address"
    assert "git" in text and "clone" in text and "tiktoken" in text and "cuda" in text
    assert "!pip" not in text and "%pip" not in text, "plain Python: the test runs cells as Python"
    assert not re.search(r"https?://", text), "no made-up address"


def test_the_sections_follow_the_chapter_in_order():
    headings = [line.lstrip("#").strip() for cell in read_notebook()["cells"] if cell["cell_type"] == "markdown"
                for line in source(cell).splitlines() if line.startswith("#")]
    positions = []
    for heading in CHAPTER_HEADINGS:
        assert heading in headings, f"no section {heading!r}"
        positions.append(headings.index(heading))
    assert positions == sorted(positions), "the sections are not in the chapter's order"


def test_no_cell_uses_jupyter_magics_or_shell_escapes():
    for cell in code_cells(read_notebook()):
        for line in source(cell).splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"{cell['id']}: {line}"


def test_the_notebook_runs_top_to_bottom_offline(sms_spam_file, tmp_path, monkeypatch, capsys):
    """Every code cell, in order, in one namespace: the tiny model trains, is evaluated with the
    chapter's metrics, saved, loaded and used on new texts, and two strategies are compared."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the notebook writes runs/notebook/
    monkeypatch.setenv("NOTEBOOK_MODO", "rapido")
    monkeypatch.setenv("SMS_SPAM_FILE", str(sms_spam_file))
    monkeypatch.setenv("NOTEBOOK_MENSAGENS", str(SMS_MESSAGES))
    monkeypatch.setenv("GPT2_CLASSIFICATION_CACHE", str(tmp_path / "empty-cache"))  # nothing downloaded before
    monkeypatch.setenv("MPLBACKEND", "Agg")  # where matplotlib is installed: no window

    def refuse(*args, **kwargs):
        address = next((arg for arg in args if isinstance(arg, tuple)), kwargs.get("address"))
        raise AssertionError(f"the notebook tried to connect to {address}: it must run offline here")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)

    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(read_notebook()["cells"]):
        if cell["cell_type"] == "code":
            exec(compile(source(cell), f"notebook.ipynb, cell {index} ({cell['id']})", "exec"), namespace)
    printed = capsys.readouterr().out

    assert namespace["MODO"] == "rapido"
    assert len(namespace["mensagens"]) == SMS_MESSAGES
    # training showed its progress, epoch by epoch
    assert re.search(r"epoch 1/1 +step \d+/\d+", printed) and "epoch 1/1 done" in printed
    # the chapter's metrics, computed on the test split
    test = namespace["relatorios"]["test"]
    assert test.num_samples == len(namespace["divisao"].test) > 0
    assert sum(map(sum, test.confusion_matrix)) == test.num_samples
    assert "confusion matrix" in printed
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib não está instalado" in printed
    else:
        assert (work / "runs" / "notebook" / "matriz_de_confusao.png").is_file()
    # a saved classifier, loaded again, labels new texts with the data's classes
    saved = work / "runs" / "notebook" / "last-block"
    assert (saved / "config.json").is_file() and (saved / "classifier.safetensors").is_file()
    predictions = namespace["previsoes_novas"]
    assert [p.text for p in predictions] == namespace["novos_textos"]
    for prediction in predictions:
        assert prediction.label in ("ham", "spam")
        assert set(prediction.probabilities) == {"ham", "spam"}
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, rel_tol=1e-5)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    # two strategies compared on the same test texts
    rows = namespace["comparacao"]
    assert [row["estratégia"] for row in rows] == ["head", "last-block"]
    assert rows[0]["parâmetros"] < rows[1]["parâmetros"]
    assert all(0 <= row["teste"] <= 1 for row in rows)
    assert "McNemar p =" in printed
