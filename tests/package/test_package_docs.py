"""Every ```python block of docs/**/*.md and README.md runs.

Blocks of one page run in order in one namespace, in a temporary working directory. A block whose
first line is ``# skip-test: <reason>`` is not run. A block that imports an optional package that
is not installed is skipped, and so is the rest of its page (later blocks may need its names).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SKIP_MARK = "# skip-test:"
# Packages a docs example may need that a minimal install lacks.
OPTIONAL = {"torch", "paddle", "triton", "mmseg", "mmengine", "mmcv", "paddleseg", "matplotlib", "tqdm", "transformers",
            "lightning", "torchmetrics", "segmentation_models_pytorch", "torchvision", "timm"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def extract_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line number, info string, code)`` for every fenced block; code is dedented by the fence's indent."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, info = m["fence"], m["indent"], m["info"].strip()
        start = i + 1
        j = start
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and set(close) == {fence[0]}:
                break
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened at line {i + 1}")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[start:j]]
        blocks.append((start + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of the blocks tagged ``python`` (language word first in the info string)."""
    out = []
    for line, info, code in extract_blocks(path.read_text(encoding="utf-8")):
        words = info.lstrip("{.").split()
        if words and words[0].rstrip("}") in ("python", "py"):
            out.append((line, code))
    return out


def optional_imports(code: str) -> list[str]:
    """The optional top-level packages that ``code`` imports."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(names & OPTIONAL)


def doc_pages() -> list[Path]:
    pages = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    return ([readme] if readme.exists() else []) + pages


PAGES_WITH_CODE = [p for p in doc_pages() if python_blocks(p)]


# A user who copies an example should not get torch's warning for a tensor made over one of the
# hierarchy's read-only arrays (other packages' warnings, such as paddle's on building an extension,
# are not the examples' doing).
@pytest.mark.filterwarnings("error:The given NumPy array is not writable:UserWarning")
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_page_examples_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    monkeypatch.syspath_prepend(str(ROOT))  # the checkout stays importable after the chdir
    namespace: dict = {"__name__": f"docs_example_{page.stem}"}
    for line, code in python_blocks(page):
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if first.startswith(SKIP_MARK):
            assert first[len(SKIP_MARK):].strip(), f"{page}:{line}: '# skip-test:' needs a reason"
            continue
        for package in optional_imports(code):
            pytest.importorskip(package, reason=f"{page.name}:{line} (and later blocks) need {package}")
        # from a file, so that code which reads its own source (paddle.jit.to_static) finds it
        source = tmp_path / f"{page.stem}_line{line}.py"
        source.write_text(code)
        compiled = compile(code, str(source), "exec")
        try:
            exec(compiled, namespace)
        except Exception as exc:  # re-raise with the block's location in the message
            raise AssertionError(f"example at {page.relative_to(ROOT)} line {line} failed: {exc!r}") from exc


# ------------------------------------------------------------------ the harness itself
def test_extract_blocks_handles_fences_and_indent():
    text = "\n".join([
        "intro",
        "```python",
        "a = 1",
        "```",
        "!!! note",
        "    ```python",
        "    b = a + 1",
        "    ```",
        "````markdown",
        "```python",
        "not a block",
        "```",
        "````",
        "```bash",
        "echo hi",
        "```",
    ])
    blocks = extract_blocks(text)
    assert [(info, code) for _, info, code in blocks] == [
        ("python", "a = 1\n"),
        ("python", "b = a + 1\n"),
        ("markdown", "```python\nnot a block\n```\n"),
        ("bash", "echo hi\n"),
    ]
    assert [line for line, _, _ in blocks] == [3, 7, 10, 15]


def test_unclosed_fence_is_an_error():
    with pytest.raises(ValueError, match="unclosed code fence opened at line 2"):
        extract_blocks("x\n```python\nprint(1)\n")


def test_optional_imports_are_found():
    assert optional_imports("import numpy\nimport os") == []
    assert optional_imports("import not_a_real_pkg_xyz") == []  # not optional: must fail loudly when run
    code = "import torch.nn as nn\nfrom mmseg.registry import MODELS\nfrom . import x\nimport paddle, json"
    assert optional_imports(code) == ["mmseg", "paddle", "torch"]


def test_docs_have_runnable_examples():
    # Guards against the extractor silently finding nothing (which would make the suite vacuous).
    assert len(PAGES_WITH_CODE) >= 8
    assert sum(len(python_blocks(p)) for p in PAGES_WITH_CODE) >= 25


def test_every_page_is_in_the_nav():
    nav_text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav_text, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml nav"
    assert listed - pages == set(), "nav entries without a page"


def test_hook_renders_sphinx_roles_as_code():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = ("see :func:<code>tree_min_loss</code> and :class:<code>~hieraloss.Hierarchy</code>, "
            ":py:meth:<code>a.b</code>, not ratio:<code>x</code>")
    assert hooks.on_page_content(html) == (
        "see <code>tree_min_loss</code> and <code>Hierarchy</code>, <code>a.b</code>, "
        "not ratio:<code>x</code>")
