"""Every Python example a user reads runs: the README's ```python blocks and the ``::`` blocks of
the analysis modules' docstrings (issue 11: the package docstring's example raised KeyError).

Each example runs in a fresh folder, as a user would run it after a certification run. The
places it names are made real there: a path-like string literal (``a/b``, ``s3://bucket/a/b``;
a URI becomes the same path in the folder) is a run directory written by
:class:`pipeline.run_dir.RunDirectory` with synthetic counts (``.../counts``: that run's counts
folder), a ``.parquet`` file a counts file, a ``.tsv`` file a legacy log; other files (outputs)
get their parent folder. An example that raises, or that names something else, fails here.
"""
from __future__ import annotations

import ast
import pkgutil
import re
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import analysis
from analysis import certify_table, write_legacy_log
from analysis.synthetic import synthetic_counts
from pipeline.counts_schema import COUNTS_SCHEMA
from pipeline.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = (0.25, 0.5, 1.0)
LOCATION = re.compile(r"^(?:[a-z][a-z0-9+.-]*://)?[\w.-]+(?:/[\w.-]+)+/?$")


def readme_examples() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    return [(f"README.md python block {i + 1}", block) for i, block in enumerate(blocks)]


def literal_blocks(doc: str) -> list[str]:
    """The reStructuredText literal blocks of a docstring: the indented lines after a line ending in ``::``."""
    blocks, lines = [], doc.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return [b for b in blocks if b]


def docstring_examples() -> list[tuple[str, str]]:
    """``::`` blocks of the module docstrings of the analysis package and its modules."""
    modules = [analysis.__name__] + [f"analysis.{m.name}" for m in pkgutil.iter_modules(analysis.__path__)]
    out = []
    for name in modules:
        doc = ast.get_docstring(ast.parse(Path(__import__(name, fromlist=["_"]).__file__).read_text())) or ""
        out += [(f"{name} docstring example {i + 1}", block) for i, block in enumerate(literal_blocks(doc))]
    return out


EXAMPLES = dict(readme_examples() + docstring_examples())


def write_run(path: Path) -> None:
    """A run directory as the pipeline leaves it: manifest, counts files, one error record."""
    run_id = path.name
    table = synthetic_counts(30, SIGMAS, num_classes=10, n0=20, n=200, seed=3, run_id=run_id)
    optional = {f.name: pa.nulls(table.num_rows, f.type) for f in COUNTS_SCHEMA if f.name not in table.column_names}
    table = pa.table({**{n: table[n] for n in table.column_names}, **optional})
    store = RunDirectory(str(path.parent), run_id)
    store.write_manifest({"run_id": run_id, "config": {"smoothing": {"sigmas": list(SIGMAS), "mode": "full",
                                                                     "p0": 0.5, "alpha": 0.001}}})
    for lo in range(0, table.num_rows, 40):
        store.write_counts(table.slice(lo, 40))
    store.write_error("unreadable.jpg", "shard-0.tar", "ImageError: pixel mode F has no defined 8-bit RGB scale")


def materialise(location: str, folder: Path) -> str:
    """Make ``location`` real under ``folder``; returns the local path the example reads instead."""
    local = folder / location.split("://", 1)[-1].rstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    if local.exists():
        return str(local)
    if local.name == "counts":
        write_run(local.parent)
    elif local.suffix == ".parquet":
        pq.write_table(synthetic_counts(10, SIGMAS, num_classes=10, n0=20, n=200, run_id="file"), local)
    elif local.suffix == ".tsv":
        results = certify_table(synthetic_counts(10, SIGMAS, num_classes=10, n0=20, n=200), cascades=[])
        write_legacy_log(results[results["method"] == "sigma=0.5"], str(local))
    elif not local.suffix:
        write_run(local)
    return str(local)


class _Locations(ast.NodeTransformer):
    def __init__(self, folder: Path):
        self.folder = folder

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.JoinedStr:
        return node  # the pieces of an f-string are not locations of their own

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if isinstance(node.value, str) and LOCATION.match(node.value):
            return ast.copy_location(ast.Constant(materialise(node.value, self.folder)), node)
        return node


def run_example(code: str, name: str, folder: Path) -> dict:
    tree = ast.fix_missing_locations(_Locations(folder).visit(ast.parse(code, filename=name)))
    namespace = {"__name__": "__example__"}
    exec(compile(tree, name, "exec"), namespace)  # noqa: S102 - the documentation's own examples
    return namespace


def test_the_examples_are_found():
    """The README and the package docstring hold examples; a change that hides them fails here."""
    assert any(name.startswith("README.md") for name in EXAMPLES)
    assert "analysis docstring example 1" in EXAMPLES
    assert "to_markdown" in EXAMPLES["analysis docstring example 1"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    run_example(EXAMPLES[name], name, tmp_path)


def test_a_broken_example_fails(tmp_path, monkeypatch):
    """The harness itself: locations become local runs, and an example's error reaches the test."""
    monkeypatch.chdir(tmp_path)
    namespace = run_example('import analysis\ntable = analysis.load_counts("s3://bucket/runs/run-9")\n', "ok", tmp_path)
    assert namespace["table"].num_rows == 90 and (tmp_path / "bucket/runs/run-9/manifest.json").exists()
    with pytest.raises(KeyError):
        run_example('import analysis\nresults = analysis.certify_table(analysis.load_counts("runs/r"))\n'
                    'summary = analysis.summarize(results, radii=[0])\nsummary["r=0.25"]\n', "broken", tmp_path)
