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


def project_imports(module: str, as_script: bool = True) -> set[str]:
    """The project modules `module` imports anywhere: at the top, inside functions, and (unless
    as_script is False) in its `if __name__ == "__main__":` block, which runs as a command."""
    tree = ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if not as_script and isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            node.body = []  # what runs only as a script
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found & set(MODULES)




def test_the_spine_and_the_machinery_are_all_there():
    assert set(SPINE) <= set(MODULES)
    assert set(MODULES) - set(SPINE) == {"fastpath", "distributed", "report", "comparison", "evaluation", "hub", "hfformat",
                                         "runner", "datafiles", "runfiles", "lora", "serve"}


def test_imports_flow_one_way_with_no_cycle_even_counting_commands_and_functions():
    graph = {module: project_imports(module) for module in MODULES}
    order: list[str] = []  # a topological order exists exactly when there is no cycle
    while len(order) < len(graph):
        ready = [m for m in graph if m not in order and graph[m] <= set(order)]
        assert ready, f"an import cycle among {sorted(set(graph) - set(order))}: {graph}"
        order += sorted(ready)
    assert "train" not in set().union(*graph.values()), "nothing imports the main job"


def test_gpt_and_metrics_import_no_project_module_and_hub_none_at_all():
    """Imported as libraries, gpt and metrics need torch alone; gpt's command hands over to hub,
    which imports no project module, so `python gpt.py` makes no cycle."""
    assert project_imports("gpt", as_script=False) == set() and project_imports("metrics") == set()
    assert project_imports("gpt") == {"hub"} and project_imports("hub") == set()


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


def test_gpt_py_copied_alone_says_in_one_line_that_its_command_needs_hub_py(tmp_path):
    code = "import runpy, sys\nsys.argv = ['gpt.py', 'Every effort moves']\nrunpy.run_path('gpt.py', run_name='__main__')"
    result = run_alone("gpt", code, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs hub.py" in result.stderr


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


CALL_COUNTER = """
import sys, json
sys.path.insert(0, {repo!r})
import train
files = {{str(p) for p in __import__("pathlib").Path({repo!r}).glob("*.py")}}
called = set()

class FirstStep(Exception):
    pass

def caller_in_project(frame):
    while frame is not None and frame.f_code.co_filename not in files:
        frame = frame.f_back  # through torch's own frames (nn.Module.__call__ -> forward)
    return frame

def profile(frame, event, arg):
    code = frame.f_code
    if event != "call":
        return
    if code.co_name == "step" and "torch/optim" in code.co_filename:
        sys.setprofile(None)
        raise FirstStep
    caller = caller_in_project(frame.f_back)
    if code.co_filename in files and caller is not None and caller.f_code.co_filename.endswith("train.py") \\
            and not code.co_filename.endswith("train.py"):
        called.add(__import__("pathlib").Path(code.co_filename).stem + "." + code.co_name)

sys.setprofile(profile)
try:
    train.main({argv!r})
except FirstStep:
    pass
sys.setprofile(None)
print(json.dumps(sorted(called)))
"""


def test_the_main_job_reaches_its_first_update_through_few_other_files(tmp_path):
    """From train.main to the first optimizer.step(), the functions of other project files that
    train.py calls (sys.setprofile on a tiny run; len() and property reads count too): the
    chapter's steps and one seam per piece of machinery. 35 before the one-path change."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257,
                                                               "n_positions": 64, "n_embd": 16, "n_layer": 2,
                                                               "n_head": 2}))
    (tmp_path / "sms.txt").write_text("".join(f"{'spam' if i % 3 else 'ham'}\tmessage number {i}\n"
                                              for i in range(60)), encoding="utf-8")
    argv = ["--data", str(tmp_path / "sms.txt"), "--model", str(tmp_path / "tiny"), "--init", "random",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    code = CALL_COUNTER.format(repo=str(REPO), argv=argv)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    called = json.loads(result.stdout.splitlines()[-1])
    steps = {"data.load_splits", "data.tokenize", "gpt.__init__", "classify.__init__", "classify.apply_strategy",
             "classify.forward", "data.bucket_batches"}
    assert steps <= set(called), "the chapter's steps are called from train.py itself"
    assert len(called) <= 20, called  # the rest: one seam per machinery (torchrun, frozen output, the log)
