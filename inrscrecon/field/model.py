"""The field f(x, y, z) → expression of M genes: encoding → MLP trunk → softplus head (DESIGN §2).

Coordinates enter in physical units (µm) and are normalised inside with one isotropic scale:
``c = (xyz − center) / scale`` so that the training cells lie in [−1, 1]³ along their longest axis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from inrscrecon.field.encoding import EncodingConfig, PositionalEncoding
from inrscrecon.field.mlp import Trunk

FORMAT_VERSION = 1


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
        d = json.loads(text)
        d["encoding"] = EncodingConfig(**d["encoding"])
        d["center"] = tuple(d["center"])
        return cls(**d)


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

    def save(self, path: str | Path) -> None:
        """Weights + config in one safetensors file (config JSON in its metadata)."""
        from inrscrecon.data.io import atomic_path

        final, tmp = atomic_path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"config": self.cfg.to_json(), "format": str(FORMAT_VERSION), "kind": "inrscrecon.INRField"}
        try:
            save_file(state, str(tmp), metadata=meta)
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> INRField:
        """Load a field saved by :meth:`save` (safetensors: no pickled objects are executed)."""
        from safetensors import safe_open

        from inrscrecon.errors import InputError

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: model file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(device))
        except Exception as exc:
            raise InputError(f"{path}: not an inrscrecon model file ({type(exc).__name__}: {exc})") from None
        if meta.get("kind") != "inrscrecon.INRField":
            raise InputError(f"{path}: not an inrscrecon model file (metadata kind={meta.get('kind')!r})")
        model = cls(FieldConfig.from_json(meta["config"])).to(device)
        model.load_state_dict(state)
        model.eval()
        return model
