"""The field f(x, y, z) → expression of M genes: encoding → MLP trunk → softplus head (DESIGN §2).

Coordinate frame (docs/coordinates.md). Coordinates enter in physical units (µm) and are normalised inside:
``c = (xyz − center) / scale`` with one isotropic scale, so that the training cells lie in [−1, 1] along
their longest axis, and then ``c_z ← z_stretch · c_z`` (x, y unchanged). A serial-section stack is flat (on
Visium DLPFC z spans ≈ 5 % of the cube), so with ``z_stretch = 1`` the encoding's bands barely vary along z;
``z_stretch > 1`` gives z more bandwidth without touching the encoding or the fused Fourier trunk, which only
ever see normalised coordinates. Everything outside the field (tissue frame, out-of-domain checks, render
grids, section knots) stays in µm.

Section codes (``section_code_dim = D > 0``, NeRF-W-style appearance embedding): one learned vector per
training section (``section_codes`` [S, D], initialised to 0) at the section's z (``section_knots_z``, µm);
the code at any z is the linear interpolation between the two knots around it (clamped outside the knot
range) and enters the features as ``hidden = trunk(enc(c)) + code(z) @ code_projᵀ``. The head being linear in
the features, this is a rank-D per-section gene-wise offset on the head's pre-activation, so every fused
head + loss kernel works unchanged. A training cell sits on its section's knot and gets exactly its code; a
held-out section between two training sections gets its neighbours' codes interpolated in z
(:meth:`INRField.code_use` says which, and warns once).

Model file (one ``.safetensors``): the state dict's tensors, and string metadata ``kind`` =
``inrscrecon.INRField``, ``format`` (:data:`FORMAT_VERSION`), ``config`` (:class:`FieldConfig` as JSON) and,
from format 2 on, ``training`` (JSON: how the model was fitted, e.g. the held-out sections). Loading checks
every part against the schema in :mod:`inrscrecon.field.schema` (a supported format, config keys that are
fields of the config dataclasses, tensor names and shapes that the config implies, finite weights). Format 3 adds the
config fields ``z_stretch``, ``section_code_dim``, ``section_knots_z`` (and the tensors ``section_codes``,
``code_proj.weight`` when codes are on); files of formats 1 and 2 load with their defaults (isotropic, no
codes) and predict exactly as before. Count models may carry a library-size head (config ``library_head``,
``library_mean``, ``library_sd``, ``library_detach``; tensors ``library_head.weight`` [1, W] and
``library_head.bias`` [1]): format-3 files without it load as models without one. A low-rank gene head
(config ``head_rank`` r > 0; tensor ``head_down.weight`` [r, W], ``head.weight`` [M, r]) maps the features
through Linear(W, r) before the head, so every head kernel sees K = r; files without it load as full heads.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from inrscrecon.field.encoding import EncodingConfig, PositionalEncoding
from inrscrecon.field.mlp import Trunk

#: Version written by :meth:`INRField.save`. 1: tensors + config; 2: adds the ``training`` record;
#: 3: anisotropic frame (``z_stretch``) and per-section codes (``section_code_dim``, ``section_knots_z``).
FORMAT_VERSION = 3
SUPPORTED_FORMATS = (1, 2, 3)
KIND = "inrscrecon.INRField"

log = logging.getLogger(__name__)


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
    # anisotropic frame: normalised z is multiplied by z_stretch (x, y unchanged); 1 = isotropic (format ≤ 2)
    z_stretch: float = 1.0
    # per-section appearance codes of this width (0 = off), one per training section at its z (µm, sorted)
    section_code_dim: int = 0
    section_knots_z: list[float] = field(default_factory=list)
    # training loss: "rmse" | "poisson" | "nb"; count models read η = h·Wᵀ + b as the log-rate per 1e4 counts
    # (the prediction stays softplus(η)); "nb" adds the gene-wise log dispersion ``log_theta`` [M]
    likelihood: str = "rmse"
    # count models: a linear head on the features predicting the standardised log library size,
    # log L(x) = library_mean + library_sd · library_head(h); False in files written before it existed
    library_head: bool = False
    library_mean: float = 0.0
    library_sd: float = 1.0
    library_detach: bool = True  # trained on detached features: the gene field is unaffected by it
    # low-rank gene head: features [W] → Linear(W, r, no bias) → head Linear(r, M); 0 = a full W × M head
    head_rank: int = 0

    @property
    def feature_dim(self) -> int:
        """Width K of the features the gene head reads: ``head_rank`` when the head is low-rank, else W."""
        return self.head_rank if self.head_rank > 0 else self.width

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
        from inrscrecon.field.schema import config_from_dict

        return config_from_dict(json.loads(text), "config")


def interpolate_codes(
    z: torch.Tensor,  # [N] normalised z
    knots: torch.Tensor,  # [S] normalised z of the sections, strictly increasing
    codes: torch.Tensor,  # [S, D]
) -> torch.Tensor:
    """Per-point code [N, D]: linear interpolation of ``codes`` between the two knots around each z, the
    first / last code outside the knot range. Exact at a knot (weights 1 and 0)."""
    s = knots.shape[0]
    if s == 1:
        return codes.expand(z.shape[0], codes.shape[1])
    z = z.to(knots.dtype).contiguous()
    hi = torch.searchsorted(knots, z, right=True).clamp(1, s - 1)
    lo = hi - 1
    k_lo, k_hi = knots[lo], knots[hi]
    t = ((z - k_lo) / (k_hi - k_lo)).clamp(0.0, 1.0)[:, None].to(codes.dtype)
    return (1 - t) * codes[lo] + t * codes[hi]


def check_z_stretch(
    coords: np.ndarray,  # [N, 3] µm, the training cells
    center: tuple[float, float, float],
    scale: float,
    z_stretch: float,
) -> float:
    """``z_stretch`` itself, after one InputWarning when it carries training cells outside [−1, 1] in z
    (where the hash grid clamps and the lowest Fourier band wraps); the warning names the largest stretch that
    keeps them inside."""
    from inrscrecon.errors import InputError, InputWarning

    if not (math.isfinite(z_stretch) and z_stretch > 0):
        raise InputError(f"z_stretch = {z_stretch!r} is not a positive number")
    z = np.abs(np.asarray(coords, dtype=np.float64)[:, 2] - center[2]) / scale
    reach = float(z.max()) if len(z) else 0.0
    if reach * z_stretch > 1.0 + 1e-9:
        warnings.warn(
            f"z_stretch {z_stretch:g} puts training cells at normalised z = ±{reach * z_stretch:.3g}, outside "
            f"[-1, 1]; at most {1.0 / reach:.3g} keeps them inside (docs/coordinates.md)",
            InputWarning,
            stacklevel=2,
        )
    return float(z_stretch)


def section_code_settings(
    coords: np.ndarray,  # [N, 3] µm, the training cells
    section: np.ndarray | None,  # [N] section label per cell (None: a 3D point cloud)
    dim: int,
) -> dict[str, Any]:
    """FieldConfig settings for per-section codes of width ``dim`` from the training cells:
    ``{"section_code_dim", "section_knots_z"}`` (the sections' z, µm, sorted).

    Codes need a serial-section stack: ≥ 2 sections, each at one z, at distinct z. Otherwise (a 3D cloud, a
    section spread in z, two sections at one z) codes are turned off (dim 0) with one InputWarning saying why.
    """
    from inrscrecon.errors import InputWarning

    off: dict[str, Any] = {"section_code_dim": 0, "section_knots_z": []}
    if dim <= 0:
        return off
    z = np.asarray(coords, dtype=np.float64)[:, 2]
    why = ""
    if section is None or len(z) == 0:
        why = "the cells have no sections (a 3D point cloud)"
    else:
        labels, inv = np.unique(np.asarray(section).astype(str), return_inverse=True)
        tol = 1e-6 * max(float(np.ptp(np.asarray(coords, dtype=np.float64), axis=0).max()), 1.0)
        lo = np.full(len(labels), np.inf)
        hi = np.full(len(labels), -np.inf)
        np.minimum.at(lo, inv, z)
        np.maximum.at(hi, inv, z)
        spread = np.flatnonzero(hi - lo > tol)
        knots = np.sort((lo + hi) / 2)
        if len(labels) < 2:
            why = "they need at least 2 sections"
        elif len(spread):
            k = int(spread[0])
            why = f"section {str(labels[k])!r} spans z = {lo[k]:g}..{hi[k]:g} µm (a 3D cloud, not one z per section)"
        elif (np.diff(knots) <= tol).any():
            k = int(np.flatnonzero(np.diff(knots) <= tol)[0])
            why = f"two sections share z = {knots[k]:g} µm"
        else:
            return {"section_code_dim": int(dim), "section_knots_z": [float(v) for v in knots]}
    warnings.warn(f"section codes turned off (section_code_dim 0): {why}", InputWarning, stacklevel=2)
    return off


class InterpolatedCodesWarning(UserWarning):
    """Query points between (or beyond) the training sections got z-interpolated (or clamped) section codes."""


class INRField(nn.Module):
    """Encoding + trunk (+ section codes) + gene head. ``forward`` takes normalised coords [N, 3] and returns
    [N, M] ≥ 0."""

    center: torch.Tensor
    scale: torch.Tensor
    stretch: torch.Tensor  # [3]: (1, 1, z_stretch)
    knots: torch.Tensor  # [S]: section knots in normalised z
    section_codes: nn.Parameter | None
    log_theta: nn.Parameter | None  # [M] NB models only
    code_proj: nn.Linear | None
    head_down: nn.Linear | None  # [r, W] low-rank head models only
    library_head: nn.Linear | None  # count models fitted with a library-size field

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.encoding = PositionalEncoding(cfg.encoding)
        self.trunk = Trunk(self.encoding.out_dim, cfg.width, cfg.n_layers)
        if cfg.head_rank < 0:
            raise ValueError(f"head_rank must be >= 0, got {cfg.head_rank}")
        self.head = nn.Linear(cfg.feature_dim, cfg.n_genes)
        self.register_buffer("center", torch.tensor(cfg.center, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32))
        # derived from the config, so not saved: the frame's z stretch and the knots in normalised z (computed
        # with the same float32 operations as normalize, so a cell at a knot's z lands exactly on it)
        stretch = torch.tensor([1.0, 1.0, cfg.z_stretch], dtype=torch.float32)
        self.register_buffer("stretch", stretch, persistent=False)
        knots = torch.tensor(cfg.section_knots_z, dtype=torch.float32).reshape(-1)
        self.register_buffer("knots", (knots - self.center[2]) / self.scale * stretch[2], persistent=False)
        if cfg.section_code_dim > 0:
            if not cfg.section_knots_z:
                raise ValueError("section_code_dim > 0 needs section_knots_z (one z per training section)")
            self.section_codes = nn.Parameter(torch.zeros(len(cfg.section_knots_z), cfg.section_code_dim))
            self.code_proj = nn.Linear(cfg.section_code_dim, cfg.width, bias=False)
        else:
            self.section_codes, self.code_proj = None, None
        # NB dispersion θ_g = exp(log_theta_g), trained with the field; θ = 10 at the start
        nb = cfg.likelihood == "nb"
        self.log_theta = nn.Parameter(torch.full((cfg.n_genes,), math.log(10.0))) if nb else None
        # created last, so that the other parameters' initialisation does not depend on it
        self.library_head = nn.Linear(cfg.feature_dim, 1) if cfg.library_head else None
        # the low-rank head's first factor, after the library head: with head_rank 0 nothing changes
        self.head_down = nn.Linear(cfg.width, cfg.head_rank, bias=False) if cfg.head_rank > 0 else None
        self.training_record: dict[str, Any] = {}  # how the model was fitted (saved with it, format ≥ 2)

    def normalize(self, xyz: torch.Tensor) -> torch.Tensor:
        """Physical coordinates [N, 3] (µm) → normalised [N, 3]: isotropic frame, then z × z_stretch."""
        return (xyz.to(self.center.dtype) - self.center) / self.scale * self.stretch

    def code_term(self, coords: torch.Tensor) -> torch.Tensor:
        """Section-code contribution to the features: code(z) @ code_projᵀ, normalised coords [N, 3] → [N, W].
        Only for a model with codes (``section_code_dim > 0``)."""
        assert self.section_codes is not None and self.code_proj is not None, "the model has no section codes"
        code = interpolate_codes(coords[:, 2], self.knots, self.section_codes)
        return self.code_proj(code)

    def with_codes(self, hidden: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Trunk output [N, W] → the features the head reads [N, K]: plus the section-code term at normalised
        coords [N, 3] (with codes), then through the low-rank head's first factor (``head_rank`` r > 0: K = r;
        else K = W). What a fused trunk's output needs to equal :meth:`hidden`."""
        if self.section_codes is not None:
            hidden = hidden + self.code_term(coords).to(hidden.dtype)
        if self.head_down is not None:
            hidden = self.head_down(hidden.to(self.head_down.weight.dtype))
        return hidden

    def hidden(self, coords: torch.Tensor) -> torch.Tensor:
        """Normalised coords [N, 3] → head features [N, K]: trunk(encoding) (+ the section-code term, then the
        low-rank factor when ``head_rank`` > 0; see :meth:`with_codes`)."""
        return self.with_codes(self.trunk(self.encoding(coords)), coords)

    def code_use(self, xyz: np.ndarray, warn: bool = True) -> dict[str, Any] | None:
        """Which section codes queries at xyz [N, 3] (µm) get; None for a model without codes.

        Returns ``{"knots_z_um", "n_at_knot", "n_interpolated", "n_clamped", "interpolated_between"}`` (the
        last: ``[[z_lo, z_hi, n_points], ...]`` µm, the knot pairs whose codes were interpolated). With ``warn``
        one :class:`InterpolatedCodesWarning` says so when any point is off the knots."""
        if self.section_codes is None:
            return None
        knots = np.asarray(self.cfg.section_knots_z, dtype=np.float64)
        z = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)[:, 2]
        tol = 1e-6 * max(float(self.cfg.scale), 1.0)  # float32 rounding of µm coordinates
        near = np.abs(z[:, None] - knots[None, :]).min(axis=1) <= tol if len(z) else np.zeros(0, bool)
        clamped = ~near & ((z < knots[0]) | (z > knots[-1]))
        between = ~near & ~clamped
        hi = np.searchsorted(knots, z[between], side="right")
        pairs = [
            [float(knots[h - 1]), float(knots[h]), int(n)] for h, n in zip(*np.unique(hi, return_counts=True))
        ]
        rec = {
            "knots_z_um": [float(k) for k in knots],
            "n_at_knot": int(near.sum()),
            "n_interpolated": int(between.sum()),
            "n_clamped": int(clamped.sum()),
            "interpolated_between": pairs,
        }
        if warn and (pairs or clamped.any()):
            parts = []
            if pairs:
                said = "; ".join(f"z={a:g} and {b:g} µm ({n} points)" for a, b, n in pairs[:4])
                more = f" and {len(pairs) - 4} more pairs" if len(pairs) > 4 else ""
                parts.append(f"section codes interpolated in z between sections at {said}{more}")
            if clamped.any():
                parts.append(
                    f"{int(clamped.sum())} points beyond the training sections (z={knots[0]:g}..{knots[-1]:g} "
                    "µm) take the nearest end section's code"
                )
            msg = "; ".join(parts)
            log.info(msg)
            warnings.warn(msg, InterpolatedCodesWarning, stacklevel=2)
        return rec

    def head_out(self, hidden: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Features [N, K] → softplus head [N, M] or only the rows ``gene_idx`` [G] of the head → [N, G]."""
        w: torch.Tensor = self.head.weight
        b: torch.Tensor = self.head.bias
        if gene_idx is not None:
            w, b = w[gene_idx], b[gene_idx]
        return F.softplus(F.linear(hidden, w, b))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.head_out(self.hidden(coords))

    def log_library(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted log library size log L(x) [N] (natural log of total counts) from features [N, K]; only
        for a model with a library head (``cfg.library_head``)."""
        assert self.library_head is not None, "the model has no library-size head"
        z = self.library_head(hidden.to(self.library_head.weight.dtype))[:, 0]
        return self.cfg.library_mean + self.cfg.library_sd * z

    @torch.no_grad()
    def init_head_bias(self, mean_expr: torch.Tensor) -> None:
        """Start the head at the mean profile [M]: bias = softplus⁻¹(mean), so training begins at the
        mean-profile baseline instead of softplus(0) everywhere."""
        y = mean_expr.to(self.head.bias).clamp_min(1e-3)
        self.head.bias.copy_(y + torch.log(-torch.expm1(-y)))

    @torch.no_grad()
    def init_count_bias(self, mean_rate: torch.Tensor) -> None:
        """Start a count model at the mean profile: bias = log(mean normalised rate [M] per 1e4 counts),
        clamped to ≥ log(1e-3), so exp(η) starts at each gene's mean rate."""
        self.head.bias.copy_(torch.log(mean_rate.to(self.head.bias).clamp_min(1e-3)))

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
        """Load a field saved by :meth:`save` (format 1, 2 or 3; safetensors: no pickled objects are executed).

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
        from inrscrecon.field.schema import check_model_file

        cfg, training = check_model_file(meta, state, str(path))
        model = cls(cfg)
        model.load_state_dict(state)
        model.training_record = training
        model.eval()
        return model.to(device)
