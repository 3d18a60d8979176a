"""The demo end to end on a smaller stack: align → fit → predict → metrics.json and figures."""

import json

from inrscrecon.demo import DemoConfig, format_table, run_demo


def test_demo_small(tmp_path):
    cfg = DemoConfig(
        n_sections=4, cells_per_section=500, n_genes=80, holdout=2, epochs=25, width=64, progress=False
    )
    results = run_demo(tmp_path, cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) >= {"inr", "mean_profile", "knn", "linear_z", "observed", "alignment"}
    assert saved["mean_profile"]["pearson"] is None  # undefined for a constant prediction: null, not NaN
    assert results["inr"]["rmse"] < results["mean_profile"]["rmse"]
    assert results["inr"]["pearson_noiseless"] > 0.3
    assert (tmp_path / "genes_true_vs_pred.png").stat().st_size > 0 and (tmp_path / "domains.png").exists()
    assert any((tmp_path / "alignment").glob("*.png"))
    assert "| inr |" in format_table(results)


def test_thread_policy_sets_one_thread_and_restores():
    import torch
    from threadpoolctl import threadpool_info

    from inrscrecon.demo import thread_policy

    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with thread_policy(1):
            assert torch.get_num_threads() == 1
            assert all(pool["num_threads"] == 1 for pool in threadpool_info())  # BLAS and OpenMP pools too
        assert torch.get_num_threads() == 2
        with thread_policy(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)
