"""The general-CF table is computed from run folders, so it must read them right."""

import json

from lookalike.experiments.zoo_results import load_runs, recbole_rows, sasrec_table, table


def _run(root, model, seed, recall, seconds):
    d = root / model / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {"recall@10": recall, "ndcg@10": 0.3, "hit@10": 0.8, "precision@10": 0.2,
               "mrr@10": 0.5}
    (d / "evaluate-ro-full.json").write_text(json.dumps(
        {"model": model, "variants": {"recbole": {"metrics": metrics}}}))
    (d / "train.json").write_text(json.dumps(
        {"seed": seed, "config": {}, "trainer": {}, "split": "random",
         "train": {"epochs": 10 + seed, "best_epoch": 5, "stopped": "patience",
                   "seconds": seconds, "seconds_per_epoch": 1.0}}))


def test_table_is_mean_and_std_over_seeds_with_recbole_below(tmp_path):
    for seed, recall in enumerate([0.24, 0.26]):
        _run(tmp_path, "neumf", seed, recall, 100.0)
        _run(tmp_path, "ncf-gmf", seed, 0.2, 10.0)
        _run(tmp_path, "ncf-mlp", seed, 0.2, 20.0)
    peers = tmp_path / "peers.md"
    peers.write_text("| NeuMF_RO_full | recall@10 0.2358, ndcg@10 0.2790, hit@10 0.7699, "
                     "precision@10 0.1935, mrr@10 0.4587 | 32 | early-stopped | 1.11 |\n")
    runs = load_runs(tmp_path)
    assert [r["seconds_with_pretraining"] for r in runs["neumf"]] == [130.0, 130.0]
    lines = table(runs, recbole_rows(peers)).splitlines()
    neumf = next(i for i, line in enumerate(lines) if "NeuMF" in line)
    assert "0.2500 ± 0.0141" in lines[neumf]  # mean, sample std of 0.24 and 0.26
    assert "| 10-11 (+ GMF, MLP) (patience) | 130 |" in lines[neumf]
    assert lines[neumf + 1].startswith("| RecBole NeuMF_RO_full | 0.2358 | 0.2790 |")


def test_sasrec_table_reads_both_protocols_and_variants(tmp_path):
    for seed, hit in enumerate([0.6, 0.7]):
        d = tmp_path / "sasrec-ce" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "train.json").write_text(json.dumps({"train": {
            "epochs": 40 + seed, "stopped": "patience", "seconds_per_epoch": 5.0}}))
        for protocol in ("loo-full", "loo-uni100"):
            metrics = {"hit@10": hit if protocol == "loo-uni100" else 0.1,
                       "ndcg@10": 0.3, "mrr@10": 0.2}
            (d / f"evaluate-{protocol}.json").write_text(json.dumps({"variants": {
                "recbole": {"metrics": metrics},
                "paper": {"metrics": {**metrics, "hit@10": 0.9}}}}))
    row = sasrec_table(tmp_path).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "**ours, CE**"
    assert cells[1].startswith("0.1000 ± 0.0000")  # full, RecBole variant
    assert cells[2].startswith("0.6500 ± 0.0707")  # uni100, RecBole variant
    assert cells[3].startswith("0.9000 ± 0.0000")  # full, paper variant
    assert cells[5:] == ["2", "40-41 (patience)", "5.0000 ± 0.0000"]
