"""Data-parallel training: 2 gloo processes on CPU, each streaming its shard, match one process with the same
global batch; only rank 0 writes checkpoints; a 2-process run resumes exactly."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inrscrecon.data.io import write_h5ad
from inrscrecon.data.streaming import open_stack
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.fit import TrainConfig, fit

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"
)

BATCH = 63  # odd: the two shards have 32 and 31 rows, the loss weighting must still be exact


def _run(paths, ckpt=None, resume=False, stop=None):
    torch.set_num_threads(1)
    with open_stack(paths, n_genes=20, chunk_rows=200, window=2, progress=False) as table:
        tc = TrainConfig(
            epochs=3, batch_size=BATCH, seed=4, progress=False, checkpoint_every=7, stop_after_steps=stop
        )
        return fit(table, EncodingConfig(n_bands=3), width=16, n_layers=2, loss_cfg=LossConfig.preset("no_rc"),
                   train_cfg=tc, checkpoint=ckpt, resume=resume)  # fmt: skip


def _run_resident(paths):
    """The same stack in memory: the device-resident CSR path (sparse batches through DDP)."""
    torch.set_num_threads(1)
    with open_stack(paths, n_genes=20, chunk_rows=200, window=2, progress=False) as streaming:
        table = streaming.to_cell_table()
    tc = TrainConfig(epochs=2, batch_size=BATCH, seed=4, progress=False, checkpoint_every=7, data="device")
    return fit(table, EncodingConfig(n_bands=3), width=16, n_layers=2, loss_cfg=LossConfig.preset("no_rc"),
               train_cfg=tc)  # fmt: skip


def _worker(rank: int, world: int, port: int, paths: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    from inrscrecon.train import distributed
    from inrscrecon.train import fit as fit_mod

    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world) == (rank, world)
    saver = fit_mod.save_checkpoint
    log = Path(out) / f"saves_rank{rank}.txt"

    def recording_save(state, path):  # which rank writes checkpoints
        with open(log, "a") as f:
            f.write(f"{path}\n")
        saver(state, path)

    fit_mod.save_checkpoint = recording_save
    d = Path(out)
    full = _run(paths, d / "full.ckpt")
    part = _run(paths, d / "part.ckpt", stop=10)
    resumed = _run(paths, d / "part.ckpt", resume=True)
    resident = _run_resident(paths)
    result = {
        "resident_history": resident.history,
        "resident_placement": resident.data_info["placement"],
        "resident_state": {k: v.tolist() for k, v in resident.model.state_dict().items()},
        "history": full.history, "resumed_history": resumed.history, "interrupted": part.interrupted,
        "state": {k: v.tolist() for k, v in full.model.state_dict().items()},
        "resumed_state": {k: v.tolist() for k, v in resumed.model.state_dict().items()},
    }  # fmt: skip
    (d / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(small_stack, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    return [str(write_h5ad(s, d / f"s{k}.h5ad")) for k, s in enumerate(small_stack[0])]


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_process(files, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), files, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    single = _run(files)
    # every rank ends with the same model and the same (all-reduced) history
    assert r0["history"] == r1["history"]
    for k in r0["state"]:
        np.testing.assert_array_equal(np.array(r0["state"][k]), np.array(r1["state"][k]), err_msg=k)
    # 2 ranks × half batch == 1 process × global batch, up to float summation order
    for a, b in zip(single.history, r0["history"]):
        for key in ("loss", "rmse", "kl", "val_rmse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    for k, v in single.model.state_dict().items():
        np.testing.assert_allclose(
            np.array(r0["state"][k], dtype=np.float32).reshape(v.shape),
            v.numpy(),
            rtol=1e-3,
            atol=1e-4,
            err_msg=k,
        )
    # checkpoints were written by rank 0 only; the interrupted 2-rank run resumed to the same result
    assert not (tmp_path / "saves_rank1.txt").exists()
    assert (tmp_path / "saves_rank0.txt").read_text().count("full.ckpt") >= 3
    assert r0["interrupted"] is True
    assert [h["val_rmse"] for h in r0["resumed_history"]] == [h["val_rmse"] for h in r0["history"]]
    for k in r0["state"]:
        np.testing.assert_array_equal(np.array(r0["resumed_state"][k]), np.array(r0["state"][k]), err_msg=k)
    # the device-resident CSR path under DDP: 2 ranks × half batch == 1 process, same batches
    one = _run_resident(files)
    assert r0["resident_history"] == r1["resident_history"]
    assert r1["resident_placement"] == "CSR shard resident on cpu (rank 1 of 2)"  # each rank holds its shard
    for a, b in zip(one.history, r0["resident_history"]):
        for key in ("loss", "rmse", "val_rmse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    for k, v in one.model.state_dict().items():
        np.testing.assert_allclose(np.array(r0["resident_state"][k], dtype=np.float32).reshape(v.shape), v.numpy(),
                                   rtol=1e-3, atol=1e-4, err_msg=k)  # fmt: skip


def test_single_process_helpers_are_no_ops():
    from inrscrecon.train import distributed

    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world, info.main) == (0, 1, True)
    rows = np.arange(10)
    assert distributed.shard(rows, info) is rows
    x = np.ones(3)
    assert distributed.allreduce_numpy(x) is x
    parts = [distributed.shard(rows, distributed.DistInfo(r, 3)) for r in range(3)]
    assert np.concatenate(parts).tolist() == rows.tolist() and [len(p) for p in parts] == [4, 3, 3]
