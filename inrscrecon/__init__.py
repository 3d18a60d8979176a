"""inrscrecon: 3D reconstruction of gene expression from serial spatial-transcriptomics sections.

Imports are lazy so that ``inrscrecon.kernels`` stays importable with torch + triton alone.
Public API: ``read_sections``, ``align``, ``fit``, ``INRField``, ``predict``, ``make_sections``.
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
    "InputError": "inrscrecon.errors",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'inrscrecon' has no attribute {name!r}")


__all__ = sorted(_API)
