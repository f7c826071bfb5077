"""The layout rule: jobs are entry points; no job imports another job (jobs.cli is the shared
command line, not a job). Imports are read with ``ast``, so lazy imports inside functions count."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent.parent / "jobs"
SHARED = {"jobs.cli"}


def job_imports(path: Path) -> set[str]:
    """The jobs.* modules ``path`` imports (``import jobs.x``, ``from jobs import x``, ``from jobs.x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "jobs"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "jobs":
                found |= {f"jobs.{alias.name}" for alias in node.names}
            elif node.module.startswith("jobs."):
                found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # from . import x / from .x import y
            found.add(f"jobs.{node.module or '.'.join(a.name for a in node.names)}")
    return found


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.py")), ids=lambda p: p.name)
def test_no_job_imports_another_job(path):
    others = job_imports(path) - SHARED
    assert not others, f"{path.name} imports {sorted(others)}; move what they share to pipeline/ or analysis/"


def test_detects_every_import_form(tmp_path):
    """The check itself: each way of importing a job is caught, jobs.cli and look-alikes are not."""
    source = tmp_path / "some_job.py"
    source.write_text("import jobs.certify\nfrom jobs import aggregate, cli\nfrom jobs.demo import run_demo\n"
                      "def f():\n    from .finetune import main\n"
                      "from jobs.cli import run_config_job\nimport jobsearch\nfrom pipeline.jobs import x\n")
    assert job_imports(source) - SHARED == {"jobs.certify", "jobs.aggregate", "jobs.demo", "jobs.finetune"}
