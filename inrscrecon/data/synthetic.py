"""Synthetic serial-section tissue: the embedded default for the demo and most tests.

A 3D tissue (a slab of ``extent`` µm across, sections ``spacing`` µm apart) with curved laminar domains and
smooth expression gradients. Genes are domain markers, gradient genes or background genes; counts are
negative-binomial around a per-cell mean. The tissue is cut into sections, each on a spot grid (square or
Visium-like hex) or at random cell positions, with partial overlap, and each section is placed on its "slide"
by a random rigid pose (rotation, translation, optional flip).

Pose convention (shared with ``inrscrecon.align``): observed coordinates map into the common frame by
``common = R @ (S @ observed) + t`` with ``S = diag(1, -1)`` when ``reflected`` else the identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

FLIP = np.diag([1.0, -1.0])


@dataclass
class SynthConfig:
    """Parameters of the synthetic stack. Lengths in µm."""

    n_sections: int = 6
    cells_per_section: int = 1500
    n_genes: int = 500
    n_domains: int = 5
    extent: float = 1000.0
    spacing: float = 40.0
    grid: str = "hex"  # "hex" | "square" | "random"
    library_size: float = 1500.0
    dispersion: float = 0.2
    markers_per_domain: int = 15
    gradient_fraction: float = 0.4
    max_rotation_deg: float = 180.0
    max_translation: float = 300.0
    flip_prob: float = 0.0
    overlap_jitter: float = 0.12
    seed: int = 0


@dataclass
class SynthTruth:
    """Ground truth: per-section pose (observed → common), z, common-frame xy and the tissue itself."""

    names: list[str]
    rotations: list[np.ndarray]  # each [2, 2]
    translations: list[np.ndarray]  # each [2]
    reflected: list[bool]
    z: list[float]
    xy_common: list[np.ndarray] = field(repr=False)  # each [n_k, 2]
    tissue: SyntheticTissue = field(repr=False)

    def xyz(self, k: int) -> np.ndarray:
        """True common-frame (x, y, z) of section k's cells, [n_k, 3]."""
        xy = self.xy_common[k]
        return np.column_stack([xy, np.full(len(xy), self.z[k])])


class SyntheticTissue:
    """A deterministic 3D expression field: ``domain(xyz)``, ``proportions(xyz)``, ``expected(xyz)``."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        g, k = cfg.n_genes, cfg.n_domains
        self.gene_names = [f"gene_{i:05d}" for i in range(g)]
        self.base = rng.lognormal(mean=0.0, sigma=1.0, size=g)
        effects = np.zeros((k, g))
        order = rng.permutation(g)
        n_mark = min(cfg.markers_per_domain, g // max(k, 1))
        for d in range(k):
            genes = order[d * n_mark : (d + 1) * n_mark]
            effects[d, genes] = rng.uniform(1.0, 2.5, size=len(genes))
            # a few genes are depleted in this domain
            effects[d, order[(d * n_mark + n_mark // 2) % g]] -= 1.0
        self.domain_effects = effects
        n_grad = min(int(cfg.gradient_fraction * g), max(g - k * n_mark, 0))
        self.gradient_coef = np.zeros((3, g))
        grad_genes = order[k * n_mark : k * n_mark + n_grad]
        self.gradient_coef[:, grad_genes] = rng.normal(0.0, 0.8, size=(3, n_grad))
        self.phase = rng.uniform(0, 2 * np.pi)
        self.z_extent = max(cfg.spacing * max(cfg.n_sections - 1, 1), 1.0)

    def _unit(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        half = self.cfg.extent / 2
        u = xyz[:, 0] / half
        v = xyz[:, 1] / half
        w = 2 * xyz[:, 2] / self.z_extent - 1
        return u, v, w

    def domain(self, xyz: np.ndarray) -> np.ndarray:
        """Laminar domain index of common-frame points [n, 3] → [n] ints in [0, n_domains)."""
        u, v, w = self._unit(xyz)
        depth = v + 0.25 * np.sin(1.5 * np.pi * u + self.phase + 0.1 * w) + 0.02 * w + 0.1 * u * u
        edges = np.linspace(-0.9, 0.9, self.cfg.n_domains + 1)[1:-1]
        return np.searchsorted(edges, depth).astype(np.int64)

    def proportions(self, xyz: np.ndarray) -> np.ndarray:
        """Expected fraction of each gene's counts per point, [n, G] (rows sum to 1)."""
        u, v, w = self._unit(xyz)
        fields = np.column_stack(
            [u, np.sin(np.pi * v / 2 + 0.05 * w), np.cos(np.pi * (u + v) / 2) * (1 + w) / 2]
        )
        logit = (
            np.log(self.base)[None, :] + self.domain_effects[self.domain(xyz)] + fields @ self.gradient_coef
        )
        rate = np.exp(logit - logit.max(axis=1, keepdims=True))
        return rate / rate.sum(axis=1, keepdims=True)

    def expected(self, xyz: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
        """Noiseless log1p-normalised expression at points [n, 3] → [n, G] float32."""
        return np.log1p(self.proportions(xyz) * target_sum).astype(np.float32)

    def sample_counts(self, xyz: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
        """Negative-binomial counts (gamma-Poisson) at points [n, 3] → CSR int32 [n, G]."""
        lib = rng.lognormal(np.log(self.cfg.library_size), 0.3, size=len(xyz))
        mean = self.proportions(xyz) * lib[:, None]
        phi = self.cfg.dispersion
        lam = rng.gamma(1.0 / phi, mean * phi) if phi > 0 else mean
        return sp.csr_matrix(rng.poisson(lam).astype(np.int32))


def _grid(n: int, radius: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """About n points inside a disc of the given radius, centred at 0: [n', 2]."""
    area = np.pi * radius**2
    if kind == "random":
        r = radius * np.sqrt(rng.uniform(size=n))
        a = rng.uniform(0, 2 * np.pi, size=n)
        return np.column_stack([r * np.cos(a), r * np.sin(a)])
    if kind == "square":
        step = np.sqrt(area / n)
        xs = np.arange(-radius, radius + step, step)
        pts = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    elif kind == "hex":
        step = np.sqrt(2 * area / (np.sqrt(3) * n))
        rows = np.arange(-radius, radius + step, step * np.sqrt(3) / 2)
        cols = np.arange(-radius - step, radius + step, step)
        pts = np.concatenate(
            [np.column_stack([cols + (i % 2) * step / 2, np.full_like(cols, y)]) for i, y in enumerate(rows)]
        )
    else:
        raise ValueError(f"grid must be 'hex', 'square' or 'random', got {kind!r}")
    return pts[(pts**2).sum(1) <= radius**2]


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def iter_sections(cfg: SynthConfig, chunk_size: int | None = None) -> Iterator[tuple[ad.AnnData, dict]]:
    """Yield (section AnnData, truth record) one section at a time, counts sampled ``chunk_size`` rows at once.

    ``chunk_size=None`` keeps each dense [chunk, n_genes] float64 temporary near 80 MB (20000 rows up to 500
    genes, 2000 rows at 5000 genes); the sample depends on the chunk size only when a section is larger.
    """
    if chunk_size is None:
        chunk_size = max(256, min(20000, 10_000_000 // max(cfg.n_genes, 1)))
    tissue = SyntheticTissue(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    radius = 0.45 * cfg.extent
    for k in range(cfg.n_sections):
        name = f"section_{k:02d}"
        centre = rng.uniform(-1, 1, size=2) * cfg.overlap_jitter * cfg.extent
        local = _grid(cfg.cells_per_section, radius, cfg.grid, rng)
        xy = local + centre
        z = k * cfg.spacing
        xyz = np.column_stack([xy, np.full(len(xy), z)])
        counts = sp.vstack(
            [tissue.sample_counts(xyz[i : i + chunk_size], rng) for i in range(0, len(xyz), chunk_size)]
        )
        # pose observed → common; the observed coords are its inverse applied to the common ones
        rot = _rotation(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
        trans = rng.uniform(-cfg.max_translation, cfg.max_translation, size=2)
        reflected = bool(rng.uniform() < cfg.flip_prob)
        s = FLIP if reflected else np.eye(2)
        observed = (xy - trans) @ rot @ s  # S⁻¹ Rᵀ (x − t), row-vector form (S⁻¹ = S)
        obs = pd.DataFrame(
            {"domain": pd.Categorical([f"D{d}" for d in tissue.domain(xyz)]), "section": name},
            index=[f"{name}_c{i}" for i in range(len(xy))],
        )
        adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=tissue.gene_names))
        adata.obsm["spatial"] = observed.astype(np.float64)
        adata.uns.update({"z_um": float(z), "X_kind": "raw_counts", "section": name})
        yield (
            adata,
            {"name": name, "rotation": rot, "translation": trans, "reflected": reflected, "z": z, "xy": xy},
        )


def make_sections(cfg: SynthConfig | None = None, **overrides) -> tuple[list[ad.AnnData], SynthTruth]:
    """Generate the whole stack in memory: (sections, ground truth). Keyword overrides update ``cfg``."""
    cfg = cfg or SynthConfig()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    sections, records = zip(*iter_sections(cfg))
    truth = SynthTruth(
        names=[r["name"] for r in records],
        rotations=[r["rotation"] for r in records],
        translations=[r["translation"] for r in records],
        reflected=[r["reflected"] for r in records],
        z=[r["z"] for r in records],
        xy_common=[r["xy"] for r in records],
        tissue=SyntheticTissue(cfg),
    )
    return list(sections), truth


def to_common(
    observed: np.ndarray, rotation: np.ndarray, translation: np.ndarray, reflected: bool
) -> np.ndarray:
    """Apply a pose to observed coordinates [n, 2]: R (S x) + t."""
    s = FLIP if reflected else np.eye(2)
    return observed @ s.T @ rotation.T + translation
