"""Expression domains of a field: k-means on PCA of the most variable predicted genes, at voxels inside the
tissue; each domain is described by its marker genes (highest mean predicted expression above the others)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField
from inrscrecon.query.predict import predict


@dataclass
class DomainModel:
    """Head rows ``genes`` → PCA → k-means. ``labels(pred)`` → 1..K; ``markers[k]`` the top genes of domain
    k + 1 (by mean predicted expression in the domain minus the mean over the other domains)."""

    genes: list[str]
    pca: object
    kmeans: object
    markers: list[list[str]] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        model: INRField,
        points: np.ndarray,  # [n, 3] µm, inside the tissue
        k: int,
        n_genes: int = 100,
        seed: int = 0,
        n_markers: int = 5,
    ) -> DomainModel:
        """Cluster predicted expression at sample ``points`` into ``k`` domains on the ``n_genes`` most
        variable predicted genes."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        if k < 2:
            raise InputError(f"--domains needs at least 2 clusters, got {k}")
        if len(points) < k:
            raise InputError(f"only {len(points)} voxels inside the mask; cannot form {k} domains")
        full = predict(model, points, batch_size=4096)
        top = np.sort(np.argsort(-full.var(axis=0), kind="stable")[: min(n_genes, full.shape[1])])
        genes = [model.cfg.genes[i] for i in top]
        x = full[:, top]
        pca = PCA(n_components=min(15, x.shape[1], len(x)), random_state=seed).fit(x)
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(pca.transform(x))
        lab = km.labels_
        markers: list[list[str]] = []
        for d in range(k):
            inside = lab == d
            if not inside.any() or inside.all():
                markers.append([])
                continue
            gap = x[inside].mean(axis=0) - x[~inside].mean(axis=0)
            markers.append([genes[i] for i in np.argsort(-gap, kind="stable")[:n_markers]])
        return cls(genes, pca, km, markers)

    def labels(self, pred: np.ndarray) -> np.ndarray:
        """Predicted expression of ``genes`` [n, len(genes)] → labels [n] in 1..K (uint16)."""
        if not len(pred):
            return np.zeros(0, dtype=np.uint16)
        return (self.kmeans.predict(self.pca.transform(pred)) + 1).astype(np.uint16)  # type: ignore[attr-defined]


__all__ = ["DomainModel"]
