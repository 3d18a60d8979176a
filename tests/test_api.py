"""The public Python API: every name bound and listed (``dir`` and the type stub agree with ``__all__``),
``import inrscrecon`` stays light, and ``inrscrecon.evaluate`` works as the function in either import order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import inrscrecon as ir

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_dir_and_stub_list_the_public_api():
    names = set(ir.__all__)
    assert {"render", "evaluate", "open_stack", "predict", "fit", "align", "impute_sections"} <= names
    assert names <= set(dir(ir)) and "importlib" not in dir(ir)
    stub = ast.parse((REPO / "inrscrecon" / "__init__.pyi").read_text())
    stubbed = {
        a.asname or a.name for node in stub.body if isinstance(node, ast.ImportFrom) for a in node.names
    }
    assert names <= stubbed, sorted(names - stubbed)
    assert (REPO / "inrscrecon" / "py.typed").exists()


@pytest.mark.parametrize("name", sorted(ir.__all__))
def test_every_public_name_resolves(name):
    obj = getattr(ir, name)
    assert callable(obj), name
    assert name in vars(ir)  # bound once: the next lookup does not go through __getattr__


def test_align_is_callable_after_importing_its_subpackage():
    code = (
        "import inrscrecon.align; import inrscrecon as ir; from inrscrecon.errors import InputError\n"
        "try:\n    ir.align([])\nexcept (InputError, ValueError, IndexError) as e:\n    print('called')"
    )
    assert _run(code) == "called"


def test_import_is_light():
    out = _run("import sys, inrscrecon; print('torch' in sys.modules, len(dir(inrscrecon)) > 20)")
    assert out == "False True"


@pytest.mark.parametrize(
    ("code", "call"),
    [
        ("import inrscrecon as ir; f = ir.evaluate; import inrscrecon.evaluate; g = ir.evaluate", False),
        ("import inrscrecon.evaluate; import inrscrecon as ir; f = g = ir.evaluate", True),
        (
            "from inrscrecon import evaluate as f; from inrscrecon.evaluate import evaluate as g, metrics",
            False,
        ),
    ],
    ids=["function-first", "subpackage-first", "from-imports"],
)
def test_evaluate_is_callable_in_either_import_order(code, call):
    check = "; import inspect; assert callable(f) and callable(g)\n"
    if call:  # the call goes through the module to the function (imports the evaluation stack: slow-ish)
        check += (
            "from inrscrecon.errors import InputError\n"
            "for h in (f, g):\n"
            "    try:\n"
            "        h([], 'nonsense')\n"
            "    except InputError as e:\n"
            "        assert 'unknown task' in str(e)\n"
            "    else:\n"
            "        raise SystemExit('no error')\n"
        )
    check += "print(list(inspect.signature(f).parameters)[:2], list(inspect.signature(g).parameters)[:2])"
    assert _run(code + check) == "['sections', 'task'] ['sections', 'task']"
