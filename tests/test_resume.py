"""A resume that cannot drift.

| case | outcome |
|---|---|
| interrupted mid-epoch, resumed | bitwise-equal weights; the resumed epoch logs the uninterrupted loss history |
| resume of a finished run (checkpoint) | returned as it is, no training, checkpoint untouched |
| resume of a finished run (model file, CLI) | "nothing to do", model file unchanged |
| any result-changing setting changed (lr, batch size, epochs, schedule, seed, patience, data) | InputError naming it |
| ``--resume`` without a checkpoint | InputError (exit 2, one line), nothing written |
| ``--resume-or-start`` without a checkpoint | fresh fit, equal to a plain fit |
| kill -9 at a random moment, then resume | old state or complete new one on disk; the final weights equal an uninterrupted run |
| ``--bands auto`` resumed with one candidate done, one never started | the done one returned, the other fitted: same choice |
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.checkpoint import load_checkpoint
from inrscrecon.train.fit import TrainConfig, fit


@pytest.fixture(scope="module")
def table(small_stack):
    sections, _ = small_stack
    return build_cell_table(sections[:3], select_genes(sections[:3], 40))


TC = TrainConfig(epochs=4, batch_size=100, seed=1, progress=False, checkpoint_every=5, patience=10)


def _fit(table, tc=TC, ckpt=None, resume=False, loss=None):
    return fit(table, EncodingConfig(n_bands=2), 16, 2, loss or LossConfig.preset("no_rc"), tc, ckpt, resume)


def _same_weights(a, b):
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_resumed_epoch_logs_the_uninterrupted_history(table, tmp_path):
    full = _fit(table, ckpt=tmp_path / "a.ckpt")
    steps = (int(table.n_cells * 0.9)) // 100  # steps per epoch
    stop = steps + 3  # interrupted inside the second epoch, after a checkpoint at step 5k
    part = _fit(table, replace(TC, stop_after_steps=stop), tmp_path / "b.ckpt")
    assert part.interrupted and len(part.history) == 1
    resumed = _fit(table, ckpt=tmp_path / "b.ckpt", resume=True)
    assert resumed.history == full.history  # every logged number, the resumed epoch's loss included
    _same_weights(full, resumed)


def test_resume_of_a_finished_run_does_not_train(table, tmp_path):
    ckpt = tmp_path / "f.ckpt"
    tc = replace(TC, epochs=30, patience=1, lr=0.05, min_lr_ratio=1.0)  # a rate this high stalls: stops early
    done = _fit(table, tc, ckpt)
    assert done.stopped_early and len(done.history) < 30
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    again = _fit(table, tc, ckpt, resume=True)
    assert again.resumed_finished and again.stopped_early
    assert again.history == done.history
    _same_weights(done, again)
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before  # not rewritten
    at_end = _fit(table, TC, tmp_path / "e.ckpt")  # ran all its epochs
    assert _fit(table, TC, tmp_path / "e.ckpt", resume=True).resumed_finished
    assert len(at_end.history) == TC.epochs


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(lr=1e-3), "lr"),
        (dict(batch_size=64), "batch_size"),
        (dict(epochs=5), "epochs"),
        (dict(min_lr_ratio=0.1), "min_lr_ratio"),
        (dict(seed=2), "seed"),
        (dict(patience=3), "patience"),
    ],
)
def test_resume_refuses_a_changed_setting_by_name(table, tmp_path, change, name):
    ckpt = tmp_path / "c.ckpt"
    _fit(table, replace(TC, stop_after_steps=4), ckpt)
    with pytest.raises(InputError, match=rf"another configuration \({name}: .* in the checkpoint, .* now\)"):
        _fit(table, replace(TC, **change), ckpt, resume=True)


def test_resume_refuses_changed_data(table, small_stack, tmp_path):
    ckpt = tmp_path / "d.ckpt"
    _fit(table, replace(TC, stop_after_steps=4), ckpt)
    other = build_cell_table(small_stack[0][:3], table.genes)
    other.counts = other.counts.copy()
    other.counts.data[7] += 1.0  # one count differs
    with pytest.raises(InputError, match="data fingerprint"):
        _fit(other, ckpt=ckpt, resume=True)
    with pytest.raises(InputError, match="loss.lambda_kl"):
        _fit(table, ckpt=ckpt, resume=True, loss=LossConfig(lambda_kl=0.5))


def test_resume_without_checkpoint_stops_unless_or_start(table, tmp_path):
    ckpt = tmp_path / "missing.ckpt"
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        _fit(table, ckpt=ckpt, resume=True)
    assert not ckpt.exists()
    started = _fit(table, ckpt=ckpt, resume="or_start")
    plain = _fit(table)
    assert started.history == plain.history
    _same_weights(started, plain)


def _cli_fit(files, model, *extra):
    from inrscrecon.cli import main

    flags = ["--out", str(model), "--genes", "20", "--epochs", "2", "--width", "8", "--layers", "1",
             "--bands", "2", "--quiet", "--batch-size", "64"]  # fmt: skip
    return main(["fit", *files, *flags, *extra])


@pytest.fixture(scope="module")
def stack_files(small_stack, tmp_path_factory):
    from inrscrecon.data.io import write_h5ad

    d = tmp_path_factory.mktemp("resume_stack")
    return [str(write_h5ad(s, d / f"s{k}.h5ad")) for k, s in enumerate(small_stack[0][:2])]


def test_cli_resume_rules(stack_files, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert _cli_fit(stack_files, model, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inrscrecon: error:") and "--resume-or-start" in err[0]
    assert sorted(os.listdir(tmp_path)) == []  # nothing written
    assert _cli_fit(stack_files, model, "--resume-or-start") == 0 and model.exists()
    before = (model.read_bytes(), model.stat().st_mtime_ns)
    capsys.readouterr()
    assert _cli_fit(stack_files, model, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before
    # a changed setting with a finished model and its checkpoint: refused by name
    assert _cli_fit(stack_files, model, "--resume", "--lr", "0.01") == 2
    assert "lr" in capsys.readouterr().err
    Path(str(model) + ".ckpt").unlink()  # no checkpoint left: the model file's own record names the change
    assert _cli_fit(stack_files, model, "--resume", "--lr", "0.01") == 2
    assert "fitted with other settings: lr: 0.002 there, 0.01 now" in capsys.readouterr().err
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.data.synthetic import SynthConfig, make_sections
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit
    out, resume = sys.argv[1], sys.argv[2]
    secs, truth = make_sections(SynthConfig(n_sections=2, cells_per_section=600, n_genes=300, seed=9))
    for k, s in enumerate(secs):
        s.obsm["spatial_3d"] = truth.xyz(k)
    table = build_cell_table(secs, select_genes(secs, 300))
    tc = TrainConfig(epochs=6, batch_size=64, seed=3, progress=False, checkpoint_every=3, patience=20)
    res = fit(table, EncodingConfig(n_bands=2), 32, 2, LossConfig(), tc, out + ".ckpt", resume=resume)
    res.model.save(out)
    print("done", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_at_random_moments_then_resume(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(out, resume="or_start", kill_after=None):
        proc = subprocess.Popen([sys.executable, str(script), str(out), resume], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        if kill_after is None:
            assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            return True
        time.sleep(kill_after)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        return finished

    ref = tmp_path / "ref.safetensors"
    t0 = time.time()
    run(ref, resume="no")
    wall = time.time() - t0
    from inrscrecon.field.model import INRField

    want = INRField.load(ref).state_dict()
    rng = np.random.default_rng(0)
    out = tmp_path / "k.safetensors"
    ckpt = Path(str(out) + ".ckpt")
    kills = 0
    for _ in range(2):
        if out.exists():
            break
        run(out, kill_after=float(rng.uniform(0.4, 0.95) * wall))
        kills += 1
        # on disk: nothing, or a complete checkpoint / model (old state or the complete new one)
        if ckpt.exists():
            load_checkpoint(ckpt)  # raises on a torn file
        if out.exists():
            INRField.load(out)
    run(out)  # finish (or find the finished run)
    got = INRField.load(out).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert kills >= 1


def test_band_selection_resumes_a_done_candidate_and_starts_the_missing_one(table, tmp_path):
    from inrscrecon.train.select import select_encoding

    def ck(e):
        return tmp_path / f"m.L{e.n_bands}.ckpt"

    full = select_encoding(table, None, 16, 2, LossConfig(), TC, checkpoint_for=ck)
    ck(EncodingConfig(n_bands=4)).unlink()  # as if stopped before the second candidate started
    again = select_encoding(table, None, 16, 2, LossConfig(), TC, checkpoint_for=ck, resume="or_start")
    assert [c["val_rmse"] for c in again.candidates] == [c["val_rmse"] for c in full.candidates]
    assert again.encoding == full.encoding
    _same_weights(full.result, again.result)
