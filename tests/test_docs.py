"""The README and docs/ as a new user reads them: the README is a front page (at most about 200 lines, the
two quickstart commands its first code block, the test command the one CI runs); every Python snippet runs,
every snippet taken from an example is that example's own code, every command parses, every link resolves."""

import argparse
import ast
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- example: (\S+) (\S+) -->\n)?```(\w*)\n(.*?)```", re.S)


def blocks(page: Path, language: str):
    """(example file, name, code) of each fenced block of ``language`` on ``page``."""
    return [(f, n, code) for f, n, lang, code in BLOCK.findall(page.read_text()) if lang == language]


def example_source(path: str, name: str) -> str:
    """The source of top-level function or class ``name`` in ``path`` (``Class.method``: a method), dedented."""
    text = (ROOT / path).read_text()
    nodes = ast.parse(text).body
    for part in name.split("."):
        (node,) = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        nodes = node.body
    return textwrap.dedent(ast.get_source_segment(text, node, padded=True)) + "\n"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first = BLOCK.search(text).group(4).splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert first == ["pip install -e . && python launch.py", ci]


@pytest.mark.parametrize("page", [p for p in PAGES if any(f for f, _, _ in blocks(p, "python"))], ids=page_id)
def test_snippets_from_examples_are_the_examples_own_code(page):
    for path, name, code in blocks(page, "python"):
        if path:
            assert code == example_source(path, name), f"{page_id(page)}: the snippet of {path} {name} is stale"


def toy_namespace() -> dict:
    """What the snippets take as given: a model and a loader of a few batches."""
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    return {"model": model, "loader": [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], "torch": torch, "nn": nn}


@pytest.mark.parametrize("page", [p for p in PAGES if any(not f for f, _, _ in blocks(p, "python"))], ids=page_id)
def test_every_python_snippet_runs(page):
    """In order, in one namespace per page, as a reader would paste them."""
    namespace = toy_namespace()
    for path, _, code in blocks(page, "python"):
        if not path:  # a snippet from an example is that example's code, which tests/test_examples.py runs
            exec(compile(code, page_id(page), "exec"), namespace)


class Parsed(Exception):
    """Raised by the patched parser once a command line has parsed."""


def commands(page: Path) -> list[list[str]]:
    """Every ``python launch.py`` command of the page's bash blocks (also after ``accelerate launch ...``),
    continuation lines joined and comments dropped, as argument lists."""
    found = []
    for _, _, code in blocks(page, "bash") + blocks(page, ""):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if " launch.py" in f" {line}" and not line.startswith("pip "):
                found.append([word for word in line.split("launch.py", 1)[1].split() if word != "..."])  # "...": any more
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=page_id)
def test_every_command_parses(page, monkeypatch):
    """Each command line through the command's own argument parser, stopped before it runs anything."""
    from bench.cli import main

    depth = []

    def parse_only(method):
        original = getattr(argparse.ArgumentParser, method)

        def parse(self, *args, **kwargs):  # parse_args calls parse_known_args: the outermost call decides
            depth.append(method)
            try:
                parsed = original(self, *args, **kwargs)
            finally:
                depth.pop()
            if depth:
                return parsed
            raise Parsed

        monkeypatch.setattr(argparse.ArgumentParser, method, parse)

    parse_only("parse_args")
    parse_only("parse_known_args")
    for argv in commands(page):
        with pytest.raises(Parsed):
            main(argv)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page_id(page)}: {target} does not exist"


def test_the_readme_names_every_variant():
    from optimizers import available_optimizers

    text = (ROOT / "README.md").read_text()
    assert [name for name in available_optimizers() if f"`{name}`" not in text] == []
