"""inrscrecon: 3D reconstruction of gene expression from serial spatial-transcriptomics sections.

Public API (``import inrscrecon as ir``): read sections (``read_sections``, ``open_stack`` for streaming),
``select_genes``, ``build_cell_table``, ``align``, ``fit`` → a field (``INRField``) with ``predict``,
``predict_anndata``, ``impute_sections``, ``render`` (OME-Zarr volume), ``evaluate``; the synthetic tissue
``make_sections``. Names are bound on first use, so ``import inrscrecon`` stays light (``inrscrecon.kernels``
imports with torch + triton alone); ``dir(inrscrecon)`` and the type stub ``__init__.pyi`` list them.

``inrscrecon.evaluate`` and ``inrscrecon.align`` are both functions and subpackages of those names: the
subpackage modules are callable (``ir.evaluate(sections, "inter")``, ``ir.align(sections)``), so either works
before and after ``import inrscrecon.evaluate`` / ``import inrscrecon.align``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "read_section": "inrscrecon.data.io",
    "read_sections": "inrscrecon.data.io",
    "read_csv_pair": "inrscrecon.data.io",
    "write_h5ad": "inrscrecon.data.io",
    "open_stack": "inrscrecon.data.streaming",
    "select_genes": "inrscrecon.data.preprocess",
    "build_cell_table": "inrscrecon.data.stack",
    "make_sections": "inrscrecon.data.synthetic",
    "SynthConfig": "inrscrecon.data.synthetic",
    "align": "inrscrecon.align",
    "EncodingConfig": "inrscrecon.field.encoding",
    "LossConfig": "inrscrecon.field.losses",
    "FieldConfig": "inrscrecon.field.model",
    "INRField": "inrscrecon.field.model",
    "TrainConfig": "inrscrecon.train.fit",
    "fit": "inrscrecon.train.fit",
    "predict": "inrscrecon.query.predict",
    "predict_anndata": "inrscrecon.query.predict",
    "impute_sections": "inrscrecon.query.impute",
    "GridSpec": "inrscrecon.query.grid",
    "render": "inrscrecon.query.render",
    "evaluate": "inrscrecon.evaluate",  # the callable subpackage itself
    "InputError": "inrscrecon.errors",
}
_SUBPACKAGES = ("align", "data", "evaluate", "field", "kernels", "query", "train")


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(_API[name])
        value = module if name == "evaluate" else getattr(module, name)
        globals()[name] = value  # bound once: later lookups skip this hook
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"inrscrecon.{name}")
    raise AttributeError(f"module 'inrscrecon' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (what autocomplete should offer), not this module's helpers."""
    return sorted({*_API, *_SUBPACKAGES, "__version__", "__doc__", "__file__", "__name__", "__path__"})


__all__ = sorted(_API)
