"""The layout's promises: imports flow one way with no cycle, gpt.py and metrics.py work copied
out alone (torch only), and importing a module changes no global state such as warning filters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in REPO.glob("*.py"))
SPINE = ["gpt", "data", "classify", "train", "metrics"]


def project_imports(module: str) -> set[str]:
    """The project modules `module` imports when imported (its `__main__` block aside)."""
    tree = ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            node.body = []  # what runs only as a script
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found & set(MODULES)


def test_the_spine_and_the_machinery_are_all_there():
    assert set(SPINE) <= set(MODULES)
    assert set(MODULES) - set(SPINE) == {"fastpath", "distributed", "report", "comparison", "hub", "hfformat", "serve"}


def test_imports_flow_one_way_with_no_cycle():
    graph = {module: project_imports(module) for module in MODULES}
    order: list[str] = []  # a topological order exists exactly when there is no cycle
    while len(order) < len(graph):
        ready = [m for m in graph if m not in order and graph[m] <= set(order)]
        assert ready, f"an import cycle among {sorted(set(graph) - set(order))}: {graph}"
        order += sorted(ready)
    assert graph["gpt"] == set() and graph["metrics"] == set()
    assert "train" not in set().union(*graph.values()), "nothing imports the main job"


def run_alone(module: str, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh Python that has only `module`.py copied into an empty folder: every other
    project module (and tiktoken) refuses to import."""
    (tmp_path / f"{module}.py").write_text((REPO / f"{module}.py").read_text(encoding="utf-8"), encoding="utf-8")
    blocked = [m for m in MODULES if m != module] + ["tiktoken"]
    prelude = f"import sys\nsys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
    prelude += f"sys.path.insert(0, {str(tmp_path)!r})\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_gpt_py_copied_alone_builds_gpt2_and_loads_local_weights(tmp_path):
    fixtures = REPO / "tests" / "fixtures"
    code = f"""
import torch, gpt
assert gpt.__file__.startswith({str(tmp_path)!r})
model = gpt.GPTModel(gpt.GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_layers=2, n_heads=2))
assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 100)
reference = gpt.read_safetensors({str(fixtures / "hf_tiny_logits.safetensors")!r})
for source in ({str(fixtures / "hf_tiny")!r}, {str(fixtures / "hf_tiny_hub.safetensors")!r}):
    loaded = gpt.load_gpt2(source, config=gpt.load_config({str(fixtures / "hf_tiny")!r}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(reference["input_ids"]), reference["logits"], rtol=0, atol=1e-5)
try:
    gpt.load_gpt2("gpt2-small")
except ValueError as error:
    assert "hub.py" in str(error)
print("ok")
"""
    result = run_alone("gpt", code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_metrics_py_copied_alone_reports(tmp_path):
    code = """
import json, metrics
report = metrics.classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["ham", "spam"])
print(json.dumps(report.to_dict()["confusion_matrix"]))
"""
    result = run_alone("metrics", code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ham": {"ham": 2, "spam": 0}, "spam": {"ham": 1, "spam": 1}}


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_module_changes_no_warning_filter(module):
    third_party = "import tiktoken, torch, torch.distributed, torch.nn.parallel, torch.utils.data"  # their own filters
    code = f"import warnings\n{third_party}\nbefore = list(warnings.filters)\nimport {module}\nprint(warnings.filters == before)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
