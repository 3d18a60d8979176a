"""The training step on the device-resident stack: the whole step (gather → forward → sparse loss → backward →
Adam) compiles as one graph with ``fullgraph=True`` (a graph break = a host sync = an error) and matches the
eager step; the loop draws the batches the dense path draws; the device-table fit reaches the dense path's
validation RMSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrscrecon.data.device_table import DeviceTable
from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.train import distributed as ddp
from inrscrecon.train.fit import TrainConfig, _epoch_rows, epoch_batches, fit
from inrscrecon.train.objective import PARTS, objective_tensors
from inrscrecon.train.step import TrainStep, lr_factor


@pytest.fixture(scope="module")
def table(small_stack):
    sections, _ = small_stack
    return build_cell_table(sections[:2], select_genes(sections[:2], 30))


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(table, seed=0, capturable=False):
    torch.manual_seed(seed)
    model = INRField(
        FieldConfig(len(table.genes), EncodingConfig(n_bands=2), 16, 2, *FieldConfig.frame_for(table.coords))
    ).to(DEV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=capturable)
    dt = DeviceTable(table, DEV)
    cap = dt.capacity(np.arange(table.n_cells), 64)
    cfg = LossConfig(lambda_kl=0.5)

    def loss_rows(rows):
        b = dt.gather(rows, cap)
        return objective_tensors(model, model.normalize(b.coords), b, cfg)

    return model, opt, loss_rows


INDUCTOR = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="inductor code generation takes ~90 s on a 2-core CPU; the aot_eager case traces the same single graph",
)


@pytest.mark.parametrize(
    "backend,cuda_graphs",
    [
        ("aot_eager", False),
        pytest.param("inductor", False, marks=[pytest.mark.slow, INDUCTOR]),
        # slow, like its sibling: inductor code generation (~30-60 s) would crowd gpu_check's test window
        pytest.param("inductor", True, marks=[pytest.mark.slow, INDUCTOR], id="inductor-cudagraphs"),
    ],
)
def test_whole_step_compiles_fullgraph_and_matches_eager(table, backend, cuda_graphs):
    rng = np.random.default_rng(0)
    batches = torch.as_tensor(np.sort(rng.choice(table.n_cells, (3, 64)), axis=1), device=DEV)
    m_e, opt_e, f_e = _setup(table)
    m_c, opt_c, f_c = _setup(table, capturable=DEV == "cuda")
    eager = TrainStep(f_e, opt_e, 1e-2, total=10, min_lr_ratio=0.05, compile=False)
    # fullgraph=True: any graph break (a host sync, an untraceable call) raises here
    compiled = TrainStep(
        f_c, opt_c, 1e-2, 10, 0.05, compile=True, cuda_graphs=cuda_graphs, compile_backend=backend
    )
    acc_e = torch.zeros(len(PARTS), dtype=torch.float64, device=DEV)
    acc_c = torch.zeros(len(PARTS), dtype=torch.float64, device=DEV)
    for k in range(3):
        eager(acc_e, k, batches[k])
        compiled(acc_c, k, batches[k])
    torch.testing.assert_close(acc_c, acc_e, rtol=1e-5, atol=1e-6)
    assert acc_e[0] > 0 and acc_e[2] > 0  # loss and KL were accumulated
    for (name, a), b in zip(m_e.state_dict().items(), m_c.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert float(opt_c.state[next(iter(m_c.parameters()))]["step"]) == 3
    assert opt_c.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(3, 10, 0.05))


def test_epoch_batches_are_the_dense_paths_batches(table):
    rows = np.arange(table.n_cells)
    order = _epoch_rows(table, rows, seed=3, epoch=2)
    bs, steps = 50, table.n_cells // 50
    got = epoch_batches(order, steps, bs, ddp.DistInfo())
    for s in range(steps):
        np.testing.assert_array_equal(got[s], np.sort(order[s * bs : (s + 1) * bs]))
    two = [epoch_batches(order, steps, bs, ddp.DistInfo(r, 2)) for r in range(2)]
    for s in range(steps):
        parts = [ddp.shard(np.sort(order[s * bs : (s + 1) * bs]), ddp.DistInfo(r, 2)) for r in range(2)]
        for r in range(2):
            np.testing.assert_array_equal(two[r][s], parts[r])


@pytest.mark.parametrize("likelihood", ["rmse", "poisson"])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for the GPU table"),
            ],
        ),
    ],
)
def test_device_table_feeds_the_dense_paths_batches(table, device, likelihood, monkeypatch):
    """Step by step, a fit on the device-resident table trains on exactly the batches (coordinates, targets:
    log1p-normalised, or raw counts with their library-size offsets) the dense host path trains on for the
    same seed; another seed draws other ones."""
    import inrscrecon.train.fit as fit_module

    real = fit_module.objective_tensors
    seen: list[tuple[torch.Tensor, ...]] = []

    def spy(model, coords, target, *args, **kwargs):
        if isinstance(target, torch.Tensor):
            dense, off = target, args[4] if len(args) > 4 else None
        else:
            dense, off = target.dense(model.cfg.n_genes), target.log_offset
        off = torch.zeros(0) if off is None else off
        seen.append(tuple(x.detach().float().cpu() for x in (coords, dense, off)))
        return real(model, coords, target, *args, **kwargs)

    monkeypatch.setattr(fit_module, "objective_tensors", spy)

    def run(data, dev, seed=5):
        seen.clear()
        tc = TrainConfig(epochs=2, batch_size=64, seed=seed, progress=False, data=data, device=dev)
        loss = LossConfig.preset("no_rc") if likelihood == "rmse" else LossConfig(likelihood=likelihood)
        fit(table, EncodingConfig(n_bands=2), 16, 2, loss, tc)
        return list(seen)

    dense, resident = run("dense", "cpu"), run("device", device)
    steps = int(table.n_cells * 0.9) // 64 * 2
    assert len(dense) == len(resident) >= steps - 2
    for k, ((c_d, t_d, o_d), (c_r, t_r, o_r)) in enumerate(zip(dense, resident)):
        assert torch.equal(t_r, t_d), f"step {k}: targets differ"
        assert torch.equal(o_r, o_d), f"step {k}: offsets differ"
        torch.testing.assert_close(c_r, c_d, rtol=1e-6, atol=1e-6, msg=f"step {k}: coordinates")
    assert (len(resident[0][2]) > 0) == (likelihood != "rmse")
    other = run("device", device, seed=6)
    assert not torch.equal(other[0][1], resident[0][1])


@pytest.mark.parametrize("loss", ["no_rc", "full"])
def test_device_table_fit_reaches_dense_path_rmse(table, loss):
    def run(data):
        tc = TrainConfig(epochs=4, batch_size=96, seed=2, progress=False, data=data, patience=10)
        return fit(table, EncodingConfig(n_bands=2), 16, 2, LossConfig.preset(loss), tc)

    dense, device = run("dense"), run("device")
    assert device.data_info["placement"].startswith("CSR resident on cpu")
    assert dense.data_info["placement"] == "dense host batches"
    a = [h["val_rmse"] for h in dense.history]
    b = [h["val_rmse"] for h in device.history]
    assert b == pytest.approx(a, rel=1e-4)  # same batches; the sparse loss sums in another order
    assert b[-1] < b[0]
    host = fit(table, EncodingConfig(n_bands=2), 16, 2, LossConfig.preset(loss),
               TrainConfig(epochs=4, batch_size=96, seed=2, progress=False, data="host", patience=10))  # fmt: skip
    assert [h["val_rmse"] for h in host.history] == b  # host-streamed CSR batches are the resident ones


def test_fit_on_a_stack_too_large_for_the_device_streams_and_says_so_once(table, monkeypatch, caplog):
    """A device without room for the stack: the fit streams host CSR batches instead (one warning, no
    crash) and trains on the batches the resident table would have given."""
    import inrscrecon.data.device_table as dt_module
    import inrscrecon.train.fit as fit_module

    def tiny(table, device, free_bytes=None, raw=False):
        return dt_module.device_table_or_none(table, device, free_bytes=1000, raw=raw)

    def run():
        tc = TrainConfig(epochs=2, batch_size=96, seed=4, progress=False, patience=10)
        return fit(table, EncodingConfig(n_bands=2), 16, 2, LossConfig.preset("no_rc"), tc)

    resident = run()
    monkeypatch.setattr(fit_module, "device_table_or_none", tiny)
    with caplog.at_level("WARNING", logger="inrscrecon.data.device_table"):
        streamed = run()
    assert resident.data_info["placement"].startswith("CSR resident")
    assert streamed.data_info["placement"] == "CSR batches streamed from host memory"
    said = [r for r in caplog.records if "streaming CSR batches from host memory" in r.getMessage()]
    assert len(said) == 1
    assert [h["val_rmse"] for h in streamed.history] == [h["val_rmse"] for h in resident.history]


def test_gpu_defaults_scale_batch_and_rate():
    from inrscrecon.train.fit import CPU_BATCH, CPU_LR, GPU_BATCH, resolved_batch_lr

    auto = TrainConfig(batch_size=None, lr=None)
    assert resolved_batch_lr(auto, "cpu") == (CPU_BATCH, CPU_LR)
    bs, lr = resolved_batch_lr(auto, "cuda")
    assert bs == GPU_BATCH and CPU_LR < lr <= 1e-2
    assert resolved_batch_lr(TrainConfig(batch_size=4096, lr=None), "cuda") == (
        4096,
        pytest.approx(CPU_LR * 8**0.5),
    )
    assert resolved_batch_lr(TrainConfig(), "cuda") == (512, 2e-3)  # explicit settings are kept
    assert resolved_batch_lr(auto, "cuda", n_train=900_000)[0] == 16384  # ≥ 32 steps per epoch
    assert resolved_batch_lr(auto, "cuda", n_train=13_000) == (CPU_BATCH, CPU_LR)  # a small stack: CPU batch


def test_a_host_sync_in_the_step_is_a_compile_error():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)

    def syncing_loss(rows):
        loss = model(x[rows]).pow(2).mean()
        if loss.item() > 0:  # reads the device: a graph break
            loss = loss * 1
        return loss, torch.stack([loss] * 4).detach()

    step = TrainStep(syncing_loss, opt, 1e-2, 10, 0.05, compile=True, compile_backend="aot_eager")
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|item"):
        step(torch.zeros(4, dtype=torch.float64), 0, torch.arange(4))
    # fit's form (strict=False): said once, then the same step runs eager
    lenient = TrainStep(
        syncing_loss, opt, 1e-2, 10, 0.05, compile=True, compile_backend="aot_eager", strict=False
    )
    acc = torch.zeros(4, dtype=torch.float64)
    lenient(acc, 0, torch.arange(4))
    lenient(acc, 1, torch.arange(4))
    assert not lenient.compiled and acc[0] > 0


def test_host_reads_per_fit_do_not_grow_with_steps(table):
    """Device → host reads (item, tolist, bool(), float(), .numpy(), .cpu()) during a fit happen per epoch,
    never per step: the same count with 4× as many steps. Adam's own CPU step counters are not device reads
    (they live on the host unless capturable) and are not counted."""
    import sys

    from torch.overrides import TorchFunctionMode

    reads = {"item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu", "__index__"}

    class CountReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (
                getattr(func, "__name__", "") in reads
                and "torch/optim" not in sys._getframe(1).f_code.co_filename
            ):
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for bs in (128, 32):
        mode = CountReads()
        with mode:
            fit(
                table,
                EncodingConfig(n_bands=2),
                16,
                2,
                None,
                TrainConfig(epochs=2, batch_size=bs, progress=False),
            )
        counts.append(mode.n)
    steps = [(int(table.n_cells * 0.9)) // bs * 2 for bs in (128, 32)]
    assert steps[1] > 3 * steps[0]
    assert counts[0] == counts[1] and counts[0] < steps[0]


def test_host_data_enters_a_device_table_fit_per_epoch_not_per_step(table):
    """Host → torch uploads (torch.as_tensor / torch.tensor of host data) during a fit on the device table
    happen per epoch (the permutation, validation), never per step: the same count with 4× as many steps.
    The dense path, which uploads each batch, is the control."""
    from torch.overrides import TorchFunctionMode

    class CountUploads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.as_tensor, torch.tensor) and args and not isinstance(args[0], torch.Tensor):
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for data in ("device", "dense"):
        for bs in (128, 32):
            mode = CountUploads()
            with mode:
                tc = TrainConfig(epochs=2, batch_size=bs, progress=False, data=data)
                fit(table, EncodingConfig(n_bands=2), 16, 2, LossConfig.preset("no_rc"), tc)
            counts[data, bs] = mode.n
    extra_steps = (int(table.n_cells * 0.9) // 32 - int(table.n_cells * 0.9) // 128) * 2
    assert counts["device", 128] == counts["device", 32], counts
    assert counts["dense", 32] - counts["dense", 128] >= extra_steps, counts  # ≥ 1 upload per extra step


@pytest.mark.gpu
def test_cuda_fit_sees_the_cpu_batches_and_reaches_its_rmse(table):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the device-resident fit on a GPU needs one")

    def run(**kw):
        tc = TrainConfig(epochs=3, batch_size=96, seed=2, progress=False, patience=10, **kw)
        return [h["val_rmse"] for h in fit(table, EncodingConfig(n_bands=2), 16, 2, None, tc).history]

    cpu = run(device="cpu", backend="torch", precision="fp32")
    gpu = run(device="cuda", backend="torch", precision="fp32", compile="off")
    assert gpu == pytest.approx(cpu, rel=1e-4)  # same batches, same arithmetic up to summation order
    fused = run(device="cuda", backend="auto", precision="auto", compile="on")  # what a long GPU fit runs
    assert fused == pytest.approx(cpu, rel=2e-2)
