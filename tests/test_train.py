import numpy as np
import pytest
import torch

from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.evaluate import baselines, metrics
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.field.model import INRField
from inrscrecon.query.predict import predict
from inrscrecon.train.fit import TrainConfig, fit


@pytest.fixture(scope="module")
def tables(small_stack):
    sections, _ = small_stack
    train = [s for k, s in enumerate(sections) if k != 2]
    genes = select_genes(train, 60)
    return build_cell_table(train, genes), build_cell_table([sections[2]], genes)


def _fit(table, **kw):
    tc = dict(epochs=6, batch_size=128, progress=False, seed=1, val_fraction=0.1)
    tc.update(kw.pop("tc", {}))
    return fit(
        table,
        EncodingConfig(n_bands=3),
        width=32,
        n_layers=2,
        loss_cfg=kw.pop("loss", LossConfig.preset("no_rc")),
        train_cfg=TrainConfig(**tc),
        **kw,
    )


def test_training_lowers_loss(tables):
    res = _fit(tables[0], tc=dict(epochs=8), loss=LossConfig.preset("full"))  # RC + KL
    losses = [h["loss"] for h in res.history]
    # training starts at the mean profile (head bias init), so the loss falls from that baseline
    assert losses[-1] < losses[0] - 0.03
    assert res.history[-1]["val_rmse"] < res.history[0]["val_rmse"] - 0.01


def test_inr_beats_mean_profile_on_heldout(tables):
    train, test = tables
    res = _fit(train, tc=dict(epochs=30, patience=30), loss=LossConfig.preset("no_rc"))
    true = test.targets(np.arange(test.n_cells))
    pred = predict(res.model, test.coords)
    mean = baselines.mean_profile(train.targets(np.arange(train.n_cells)), test.n_cells)
    assert metrics.rmse(pred, true) < metrics.rmse(mean, true)
    assert np.nanmedian(metrics.pearson_per_gene(pred, true)) > 0.1


def test_save_load_roundtrip(tables, tmp_path):
    res = _fit(tables[0], tc=dict(epochs=1))
    res.model.save(tmp_path / "m.safetensors")
    loaded = INRField.load(tmp_path / "m.safetensors")
    assert loaded.cfg == res.model.cfg
    xyz = tables[1].coords[:50]
    np.testing.assert_array_equal(predict(loaded, xyz), predict(res.model, xyz))


def test_resume_equals_uninterrupted(tables, tmp_path):
    full = _fit(tables[0], tc=dict(epochs=3, checkpoint_every=4), checkpoint=tmp_path / "a.ckpt")
    part = _fit(
        tables[0], tc=dict(epochs=3, checkpoint_every=4, stop_after_steps=11), checkpoint=tmp_path / "b.ckpt"
    )
    assert part.interrupted
    resumed = _fit(
        tables[0], tc=dict(epochs=3, checkpoint_every=4), checkpoint=tmp_path / "b.ckpt", resume=True
    )
    assert len(resumed.history) == len(full.history)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [h["val_rmse"] for h in resumed.history] == [h["val_rmse"] for h in full.history]


def test_resume_rejects_other_config(tables, tmp_path):
    from inrscrecon.errors import InputError

    _fit(tables[0], tc=dict(epochs=1), checkpoint=tmp_path / "c.ckpt")
    with pytest.raises(InputError, match="another configuration"):
        fit(
            tables[0],
            EncodingConfig(n_bands=5),
            width=32,
            n_layers=2,
            train_cfg=TrainConfig(epochs=1, progress=False),
            checkpoint=tmp_path / "c.ckpt",
            resume=True,
        )


def test_truncated_checkpoint_is_clear_error(tmp_path):
    from inrscrecon.errors import InputError
    from inrscrecon.train.checkpoint import load_checkpoint

    p = tmp_path / "t.ckpt"
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputError, match="truncated checkpoint"):
        load_checkpoint(p)


def test_predict_gene_subset_and_chunking(tables):
    res = _fit(tables[0], tc=dict(epochs=1))
    xyz = tables[1].coords
    full = predict(res.model, xyz)
    genes = [res.model.cfg.genes[i] for i in (5, 0, 17)]
    sub = predict(res.model, xyz, genes=genes, batch_size=37)
    np.testing.assert_allclose(sub, full[:, [5, 0, 17]], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_tracks_fp32(tables):
    fp32 = _fit(tables[0], tc=dict(epochs=3, precision="fp32"))
    bf16 = _fit(tables[0], tc=dict(epochs=3, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights
    a = [h["val_rmse"] for h in fp32.history]
    b = [h["val_rmse"] for h in bf16.history]
    assert b == pytest.approx(a, rel=2e-2)
    assert b[-1] < b[0]


def test_precision_is_checked():
    from inrscrecon.train.objective import compute_dtype

    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        compute_dtype("fp8", torch.device("cpu"))
