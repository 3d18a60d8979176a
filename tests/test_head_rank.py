"""Low-rank gene head (``FieldConfig.head_rank``): features → Linear(W, r) → head Linear(r, M). The factored
forward, rank 0 leaving the full head untouched, the model file's round trip and shape checks, and the fused
(Triton) trunk + head paths agreeing with the torch one (the head kernels see K = r)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels

from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.field.encoding import EncodingConfig  # noqa: E402
from inrscrecon.field.model import FieldConfig, INRField  # noqa: E402

M, W = 7, 32


def _model(rank: int, seed: int = 0, **extra) -> INRField:
    torch.manual_seed(seed)
    genes = [f"g{i}" for i in range(M)]
    cfg = FieldConfig(
        M, EncodingConfig(n_bands=2), W, 2, (1.0, 2.0, 3.0), 50.0, genes, head_rank=rank, **extra
    )
    return INRField(cfg)


def _coords(n: int = 37, seed: int = 1) -> torch.Tensor:  # [n, 3] normalised
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rank_head_is_the_factored_product():
    m = _model(4)
    assert m.head_down is not None and m.cfg.feature_dim == 4
    assert tuple(m.head_down.weight.shape) == (4, W) and tuple(m.head.weight.shape) == (M, 4)
    c = _coords()
    with torch.no_grad():
        trunk = m.trunk(m.encoding(c))  # [N, W]
        assert tuple(m.hidden(c).shape) == (37, 4)
        # the same field as a full head whose weight is the rank-4 product H·D
        full = torch.nn.functional.softplus(trunk @ (m.head.weight @ m.head_down.weight).T + m.head.bias)
        torch.testing.assert_close(m(c), full, rtol=1e-5, atol=1e-6)
        assert torch.linalg.matrix_rank(m.head.weight @ m.head_down.weight) == 4
        # only the rows asked for
        gi = torch.tensor([5, 0])
        torch.testing.assert_close(m.head_out(m.hidden(c), gi), m(c)[:, gi])


def test_rank_zero_keeps_the_full_head_and_its_initialisation():
    full, ranked = _model(0), _model(3)
    assert full.head_down is None and full.cfg.feature_dim == W
    assert "head_down.weight" not in full.state_dict() and tuple(full.head.weight.shape) == (M, W)
    # the trunk is initialised before the head factors: the same seed gives the same trunk either way
    for a, b in zip(full.trunk.parameters(), ranked.trunk.parameters()):
        torch.testing.assert_close(a, b)
    # a config written before the field existed (format-3 file without head_rank) reads as rank 0
    d = json.loads(full.cfg.to_json())
    del d["head_rank"]
    assert FieldConfig.from_json(json.dumps(d)).head_rank == 0


def test_rank_head_with_library_head_reads_the_rank_features():
    m = _model(5, likelihood="poisson", library_head=True)
    assert m.library_head is not None and tuple(m.library_head.weight.shape) == (1, 5)
    with torch.no_grad():
        assert tuple(m.log_library(m.hidden(_coords())).shape) == (37,)


def test_rank_model_round_trips_and_the_schema_checks_its_shapes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = _model(3)
    path = tmp_path / "m.safetensors"
    m.save(path)
    back = INRField.load(path)
    assert back.cfg.head_rank == 3
    c = _coords()
    with torch.no_grad():
        torch.testing.assert_close(back(c), m(c), rtol=0, atol=0)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    for rank, fragment in ((4, "tensor 'head.weight' has shape [7, 3]"), (0, "unexpected tensor 'head_down.weight'"),
                           (-2, "does not describe a field")):  # fmt: skip
        cfg = json.loads(meta["config"])
        cfg["head_rank"] = rank
        bad = tmp_path / f"bad{rank}.safetensors"
        save_file(state, str(bad), metadata={**meta, "config": json.dumps(cfg)})
        with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            INRField.load(bad)


@dataclass
class _Rows:
    """CSR rows of a dense batch (the SparseTarget protocol of train.objective)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    log_offset: torch.Tensor | None = None
    indices_sorted: bool = True

    @classmethod
    def of(cls, dense: torch.Tensor) -> _Rows:
        rows, cols = dense.nonzero(as_tuple=True)  # row-major: sorted by row, then gene
        indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
        indptr[1:] = torch.bincount(rows, minlength=dense.shape[0]).cumsum(0)
        return cls(indptr, cols.int(), dense[rows, cols].float())

    def dense(self, n_genes: int) -> torch.Tensor:
        n = self.indptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(n, device=self.indptr.device), self.indptr.diff())
        out = torch.zeros(n, n_genes, device=self.values.device)
        out[rows, self.indices.long()] = self.values
        return out


@pytest.mark.triton
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fused_paths_match_torch_with_a_rank_head(sparse):
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import load_interpreted

    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.objective import loss_terms

    load_interpreted("inrscrecon.kernels.triton_head_loss", "_head_stats_kernel")
    load_interpreted("inrscrecon.kernels.triton_trunk", "_trunk_fused_fwd_kernel")
    if sparse:
        load_interpreted("inrscrecon.kernels.triton_sparse_head_loss", "_sparse_head_kernel")
    dev = torch.device("cuda" if CUDA else "cpu")
    m = _model(5).to(dev)
    g = torch.Generator().manual_seed(2)
    coords = _coords().to(dev)
    dense = torch.rand(37, M, generator=g) * (torch.rand(37, M, generator=g) < 0.4)  # ~60 % zeros
    target = _Rows.of(dense.to(dev)) if sparse else dense.to(dev)
    cfg = LossConfig(lambda_rc=0.0, lambda_kl=0.5)
    out = {}
    for impl in ("torch", "triton", "auto"):
        m.zero_grad()
        r, k, _ = loss_terms(m, coords, target, cfg, None, impl, "fp32")
        (r + 0.5 * k).backward()
        out[impl] = (r.detach(), k.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    r_t, k_t, g_t = out["torch"]
    assert float(g_t["head_down.weight"].abs().max()) > 0  # the first factor is trained
    for impl in ("triton", "auto"):
        r_x, k_x, g_x = out[impl]
        torch.testing.assert_close(r_x, r_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k_x, k_t, rtol=1e-4, atol=1e-5)
        for name in g_t:
            torch.testing.assert_close(g_x[name], g_t[name], rtol=1e-3, atol=1e-5, msg=f"{impl} {name}")


# ------------------------------------------------------------------------------------------------------------
# the fit option, the CLI flag and the evaluation variant
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_table(small_stack):
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table

    sections, _ = small_stack
    return build_cell_table(sections, select_genes(sections, 30))


def test_fit_trains_a_rank_head_and_records_it(stack_table, tmp_path):
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.query.predict import predict
    from inrscrecon.train.fit import TrainConfig, fit

    tc = TrainConfig(epochs=4, batch_size=128, seed=0, progress=False)
    res = fit(stack_table, EncodingConfig(n_bands=2), 32, 2, LossConfig(), tc, head_rank=4)
    m = res.model
    assert m.cfg.head_rank == 4 and tuple(m.head.weight.shape) == (30, 4)
    assert m.training_record["run"]["head_rank"] == 4
    assert res.history[-1]["rmse"] < res.history[0]["rmse"]  # it learns through both factors
    path = tmp_path / "r.safetensors"
    m.save(path)
    xyz = stack_table.coords[:50]
    np_pred = predict(m, xyz)
    assert np_pred.shape == (50, 30)
    assert (predict(INRField.load(path), xyz) == np_pred).all()
    # the predictions lie in the span of the rank-4 head (plus the bias): rank ≤ 4 after removing it
    import numpy as np

    pre = np.log(np.expm1(np_pred.astype(np.float64)).clip(1e-30)) - m.head.bias.detach().numpy()
    assert np.linalg.matrix_rank(pre, tol=1e-3 * np.abs(pre).max()) <= 4


def test_fit_without_head_rank_records_nothing_new(stack_table):
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, run_record

    tc = TrainConfig(epochs=1, seed=0, progress=False)
    rec = run_record(stack_table, EncodingConfig(n_bands=2), 32, 2, LossConfig(), tc)
    assert "head_rank" not in rec  # records of fits made before the option existed still match
    assert (
        run_record(stack_table, EncodingConfig(n_bands=2), 32, 2, LossConfig(), tc, head_rank=8)["head_rank"]
        == 8
    )


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_fit_refuses_a_bad_head_rank(stack_table, bad):
    from inrscrecon.train.fit import TrainConfig, fit

    with pytest.raises(InputError, match="head_rank"):
        fit(
            stack_table,
            EncodingConfig(n_bands=2),
            16,
            1,
            None,
            TrainConfig(epochs=1, progress=False),
            head_rank=bad,
        )


def test_cli_fit_head_rank_flag(tmp_path, capsys):
    from conftest import write_posed_sections

    from inrscrecon.cli import main
    from inrscrecon.data.synthetic import SynthConfig

    files, _ = write_posed_sections(
        tmp_path, SynthConfig(n_sections=2, cells_per_section=120, n_genes=20, seed=4)
    )
    model = tmp_path / "m.safetensors"
    flags = [
        "--out",
        str(model),
        "--epochs",
        "1",
        "--width",
        "16",
        "--layers",
        "2",
        "--bands",
        "2",
        "--quiet",
    ]
    assert main(["fit", *files, *flags, "--head-rank", "3"]) == 0
    m = INRField.load(model)
    assert m.cfg.head_rank == 3 and m.head_down is not None and m.training_record["run"]["head_rank"] == 3
    # a changed rank is a changed fit: the finished model is not taken as already fitted
    assert main(["fit", *files, *flags]) == 0 and INRField.load(model).cfg.head_rank == 0
    with pytest.raises(SystemExit) as e:
        main(["fit", *files, *flags, "--head-rank", "-2"])
    assert e.value.code == 2 and "--head-rank" in capsys.readouterr().err


def test_rank_variant_chooses_between_full_and_rank_32():
    from inrscrecon.evaluate.inr import INR_METHODS, candidates

    v = INR_METHODS["inr_rank"]
    chosen = EncodingConfig(n_bands=2)
    cands = candidates(v, [EncodingConfig(n_bands=2), EncodingConfig(n_bands=4)], chosen)
    assert [c.options for c in cands] == [{}, {"head_rank": 32}]  # the selecting method's bands, both heads
    assert all(c.encoding == chosen for c in cands) and "head_rank=32" in cands[1].name
    assert not v.is_fit_default() and INR_METHODS["inr_rmse"].is_fit_default()
