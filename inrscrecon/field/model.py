"""The field f(x, y, z) → expression of M genes: encoding → MLP trunk → softplus head (DESIGN §2).

Coordinates enter in physical units (µm) and are normalised inside with one isotropic scale:
``c = (xyz − center) / scale`` so that the training cells lie in [−1, 1]³ along their longest axis.

Model file (one ``.safetensors``): the state dict's tensors, and string metadata ``kind`` =
``inrscrecon.INRField``, ``format`` (:data:`FORMAT_VERSION`), ``config`` (:class:`FieldConfig` as JSON) and,
from format 2 on, ``training`` (JSON: how the model was fitted, e.g. the held-out sections). Loading checks
every part against this schema (:func:`check_model_file`): a supported format, config keys that are fields of
the config dataclasses, tensor names and shapes that the config implies, finite weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from inrscrecon.field.encoding import EncodingConfig, PositionalEncoding
from inrscrecon.field.mlp import Trunk

#: Version written by :meth:`INRField.save`. 1: tensors + config; 2: adds the ``training`` record.
FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)
KIND = "inrscrecon.INRField"


@dataclass
class FieldConfig:
    """Architecture and coordinate frame of a field."""

    n_genes: int
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    width: int = 256
    n_layers: int = 4
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    genes: list[str] = field(default_factory=list)
    # the training tissue (inrscrecon.query.tissue.tissue_frame): bounding box [[x, y, z] min, max] µm,
    # section z, per-section outline polygons [[x, y], ...], median spot spacing µm; empty in older files
    bounds: list[list[float]] | None = None
    section_z: list[float] = field(default_factory=list)
    tissue: list[list[list[list[float]]]] = field(default_factory=list)
    spot_um: float = 0.0

    @staticmethod
    def frame_for(coords: np.ndarray, margin: float = 1.02) -> tuple[tuple[float, float, float], float]:
        """Isotropic frame (center, scale) mapping coords [N, 3] into [−1, 1] along the longest axis."""
        lo, hi = coords.min(axis=0), coords.max(axis=0)
        center = (lo + hi) / 2
        scale = float(max((hi - lo).max() / 2, 1e-9) * margin)
        return (float(center[0]), float(center[1]), float(center[2])), scale

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FieldConfig:
        """Inverse of :meth:`to_json`, checked against the schema (InputError on a bad config)."""
        return config_from_dict(json.loads(text), "config")


class INRField(nn.Module):
    """Encoding + trunk + gene head. ``forward`` takes normalised coords [N, 3] and returns [N, M] ≥ 0."""

    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.encoding = PositionalEncoding(cfg.encoding)
        self.trunk = Trunk(self.encoding.out_dim, cfg.width, cfg.n_layers)
        self.head = nn.Linear(cfg.width, cfg.n_genes)
        self.register_buffer("center", torch.tensor(cfg.center, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32))
        self.training_record: dict[str, Any] = {}  # how the model was fitted (saved with it, format ≥ 2)

    def normalize(self, xyz: torch.Tensor) -> torch.Tensor:
        """Physical coordinates [N, 3] (µm) → normalised [N, 3]."""
        return (xyz.to(self.center.dtype) - self.center) / self.scale

    def hidden(self, coords: torch.Tensor) -> torch.Tensor:
        """Normalised coords [N, 3] → trunk features [N, W]."""
        return self.trunk(self.encoding(coords))

    def head_out(self, hidden: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden [N, W] → softplus head [N, M] or only the rows ``gene_idx`` [K] of the head → [N, K]."""
        w: torch.Tensor = self.head.weight
        b: torch.Tensor = self.head.bias
        if gene_idx is not None:
            w, b = w[gene_idx], b[gene_idx]
        return F.softplus(F.linear(hidden, w, b))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.head_out(self.hidden(coords))

    @torch.no_grad()
    def init_head_bias(self, mean_expr: torch.Tensor) -> None:
        """Start the head at the mean profile [M]: bias = softplus⁻¹(mean), so training begins at the
        mean-profile baseline instead of softplus(0) everywhere."""
        y = mean_expr.to(self.head.bias).clamp_min(1e-3)
        self.head.bias.copy_(y + torch.log(-torch.expm1(-y)))

    def save(self, path: str | Path, training: dict[str, Any] | None = None) -> None:
        """Weights + config in one safetensors file (config JSON in its metadata), written atomically.

        ``training``: JSON-serialisable record of how the model was fitted (default :attr:`training_record`)."""
        from inrscrecon.data.atomic import atomic_output

        record = self.training_record if training is None else training
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "config": self.cfg.to_json(),
            "format": str(FORMAT_VERSION),
            "kind": KIND,
            "training": json.dumps(record),
        }
        with atomic_output(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        self.training_record = dict(record)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> INRField:
        """Load a field saved by :meth:`save` (format 1 or 2; safetensors: no pickled objects are executed).

        Raises InputError naming the file and the offending field for anything that does not match the schema.
        """
        from safetensors import safe_open

        from inrscrecon.errors import InputError

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: model file not found")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, expected a model file (.safetensors)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise InputError(f"{path}: not an inrscrecon model file ({type(exc).__name__}: {exc})") from None
        cfg, training = check_model_file(meta, state, str(path))
        model = cls(cfg)
        model.load_state_dict(state)
        model.training_record = training
        model.eval()
        return model.to(device)


def _config_keys(dc: type) -> tuple[set[str], set[str]]:
    """(all field names, required field names) of a config dataclass."""
    names = {f.name for f in fields(dc)}
    required = {f.name for f in fields(dc) if f.default is MISSING and f.default_factory is MISSING}
    return names, required


def _check_keys(d: Any, dc: type, what: str, where: str) -> None:
    from inrscrecon.errors import InputError

    if not isinstance(d, dict):
        raise InputError(f"{where}: model metadata {what} must be a JSON object, got {type(d).__name__}")
    names, required = _config_keys(dc)
    extra = sorted(set(d) - names)
    if extra:
        raise InputError(
            f"{where}: model metadata {what} has unknown key {extra[0]!r} (known: {sorted(names)})"
        )
    missing = sorted(required - set(d))
    if missing:
        raise InputError(f"{where}: model metadata {what} lacks the required key {missing[0]!r}")


def _positive_int(d: dict, key: str, what: str, where: str, minimum: int = 1) -> None:
    from inrscrecon.errors import InputError

    v = d.get(key, minimum)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"{where}: model metadata {what}.{key} = {v!r} is not an integer ≥ {minimum}")


def config_from_dict(d: Any, where: str) -> FieldConfig:
    """A :class:`FieldConfig` from its JSON object, checked field by field (keys from the dataclasses, so
    fields added with defaults are accepted and files without them still load)."""
    from inrscrecon.errors import InputError

    _check_keys(d, FieldConfig, "config", where)
    _positive_int(d, "n_genes", "config", where)
    _positive_int(d, "width", "config", where)
    _positive_int(d, "n_layers", "config", where, minimum=0)
    enc = d.get("encoding", {})
    _check_keys(enc, EncodingConfig, "config.encoding", where)
    if enc.get("kind", "fourier") not in ("fourier", "gaussian"):
        raise InputError(
            f"{where}: model metadata config.encoding.kind = {enc['kind']!r} is not fourier or gaussian"
        )
    for key in ("n_bands", "n_features"):
        _positive_int(enc, key, "config.encoding", where, minimum=0)
    center = d.get("center", (0.0, 0.0, 0.0))
    if not (isinstance(center, list | tuple) and len(center) == 3 and all(_finite(c) for c in center)):
        raise InputError(f"{where}: model metadata config.center = {center!r} is not three finite numbers")
    scale = d.get("scale", 1.0)
    if not (_finite(scale) and scale > 0):
        raise InputError(f"{where}: model metadata config.scale = {scale!r} is not a positive number")
    genes = d.get("genes", [])
    if not (isinstance(genes, list) and all(isinstance(g, str) for g in genes)):
        raise InputError(f"{where}: model metadata config.genes must be a list of gene names")
    if genes and len(genes) != d["n_genes"]:
        raise InputError(
            f"{where}: model metadata config.genes lists {len(genes)} genes but config.n_genes = {d['n_genes']}"
        )
    if len(set(genes)) < len(genes):
        raise InputError(f"{where}: model metadata config.genes has duplicate names")
    d = dict(d, encoding=EncodingConfig(**enc), center=tuple(float(c) for c in center))
    try:
        return FieldConfig(**d)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: model metadata config does not describe a field ({exc})") from None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_model_file(
    meta: dict[str, str], state: dict[str, torch.Tensor], where: str
) -> tuple[FieldConfig, dict[str, Any]]:
    """Validate a model file's metadata and tensors against the schema; returns (config, training record).

    InputError (naming ``where`` and the field) for: another kind of file, an unsupported ``format``, config
    that is not JSON / has unknown or missing keys / bad values, a gene list that does not match ``n_genes``,
    tensors missing, unexpected, of another shape than the config implies, or not finite.
    """
    from inrscrecon.errors import InputError

    if meta.get("kind") != KIND:
        raise InputError(f"{where}: not an inrscrecon model file (metadata kind={meta.get('kind')!r})")
    fmt = meta.get("format")
    if fmt is None or not str(fmt).isdigit() or int(fmt) not in SUPPORTED_FORMATS:
        raise InputError(
            f"{where}: model metadata format = {fmt!r} is not supported (this inrscrecon reads formats "
            f"{', '.join(map(str, SUPPORTED_FORMATS))}; was it written by a newer version?)"
        )
    try:
        raw = json.loads(meta.get("config", ""))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: model metadata config is not valid JSON ({exc})") from None
    cfg = config_from_dict(raw, where)
    training: dict[str, Any] = {}
    if int(fmt) >= 2 and "training" in meta:
        try:
            training = json.loads(meta["training"])
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: model metadata training is not valid JSON ({exc})") from None
        if not isinstance(training, dict):
            raise InputError(f"{where}: model metadata training must be a JSON object")
    try:
        expected = {k: tuple(v.shape) for k, v in INRField(cfg).state_dict().items()}
    except Exception as exc:  # e.g. an encoding the config cannot build
        raise InputError(f"{where}: model metadata config does not describe a field ({exc})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{where}: model file lacks tensor {missing[0]!r}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{where}: model file has unexpected tensor {extra[0]!r}")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise InputError(
                f"{where}: tensor {name!r} has shape {list(t.shape)} but the config (n_genes={cfg.n_genes}, "
                f"width={cfg.width}, n_layers={cfg.n_layers}) implies {list(shape)}"
            )
        if not t.is_floating_point():
            raise InputError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf)")
    return cfg, training
