"""`fpa-ablate <study>` end to end at the tests' scale (`--tiny`: real fpa-train runs of a tiny model for a
few steps): the report holds every arm and seed, and its numbers equal the runs' own logs, read back here
independently (TensorBoard's reader, recall.json); finished runs are not rerun."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fpa_megatron.studies.cli import main as ablate


def tables(markdown: str) -> list[dict[str, list[str]]]:
    """Every Markdown table of the report as {first cell: the row's cells}, header row under key 'header'."""
    found, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = {"header": cells}
            elif not set(line) <= set("|:- "):
                current[cells[0]] = cells
        elif current is not None:
            found.append(current)
            current = None
    if current is not None:
        found.append(current)
    return found


def table_with(markdown: str, first_header: str, column: str) -> dict[str, list[str]]:
    return next(t for t in tables(markdown) if t["header"][0] == first_header and column in t["header"])


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}
    out["_images"] = events.Tags()["images"]
    return out


def mean_std_text(values, digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def cell(row: list[str], header: list[str], column: str) -> str:
    return row[header.index(column)]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


def _run_study(tmp_path_factory, tiny_corpus, study: str, *extra: str):
    out = tmp_path_factory.mktemp(study)
    rc = ablate([study, "--tiny", "--out", str(out), "--data-dir", str(tiny_corpus), "--workers", "2", *extra])
    return rc, out


@pytest.fixture(scope="module")
def lambda_study(tmp_path_factory, tiny_corpus):
    return _run_study(tmp_path_factory, tiny_corpus, "lambda")


def test_lambda_report_holds_every_run_and_equals_the_logs(lambda_study):
    rc, out = lambda_study
    assert rc == 0
    report = (out / "report.md").read_text()
    runs = table_with(report, "run", "final val loss")
    header = runs["header"]
    names = [f"{arm}_seed{seed}" for arm in ("fpa_off", "lambda0_1") for seed in (1, 2)]
    assert sorted(k for k in runs if k != "header") == sorted(names)
    per_arm: dict[str, dict[str, list[float]]] = {}
    for name in names:
        assert json.loads((out / "runs" / name / "done.json").read_text())["returncode"] == 0
        logged = scalars(out / "runs" / name)
        row = runs[name]
        final = {"final val loss": (logged["val/loss"][-1][1], 4), "final val ppl": (logged["val/ppl"][-1][1], 2),
                 "collision": (logged["attention/collision"][-1][1], 4),
                 "entropy (nats)": (logged["attention/entropy"][-1][1], 3),
                 "lowest head entropy": (logged["attention/entropy_min"][-1][1], 3),
                 "max logit": (logged["attention/max_logit"][-1][1], 2)}
        for column, (value, digits) in final.items():
            assert cell(row, header, column) == f"{value:.{digits}f}", (name, column)
            per_arm.setdefault(name.rsplit("_seed", 1)[0], {}).setdefault(column, []).append(value)
        assert logged["val/loss"][-1][0] == 6 and logged["attention/collision"][-1][0] == 6  # the final step
        # the diagnostics run with FPA on and off: measured at steps 0, 3, 6 with per-layer values and the heatmap
        assert [s for s, _ in logged["attention/entropy"]] == [0, 3, 6]
        assert {"attention/collision/layer_00", "attention/max_logit/layer_01"} <= set(logged)
        assert "attention/entropy_heatmap" in logged["_images"]
        if name.startswith("fpa_off"):  # FPA disabled: no penalty, yet the statistics are there and non-zero
            assert all(v == 0.0 for _, v in logged["train/penalty"])
            assert all(v > 0.03 for _, v in logged["attention/collision"])  # >= mean of 1/(i+1) over 32 rows
            assert all(0 < v < math.log(32) for _, v in logged["attention/entropy"])
        else:
            assert all(v > 0 for _, v in logged["train/penalty"])
    arms = table_with(report, "arm", "final val loss")
    for arm, columns in per_arm.items():
        for column, values in columns.items():
            digits = {"final val ppl": 2, "entropy (nats)": 3, "lowest head entropy": 3, "max logit": 2}.get(column, 4)
            assert cell(arms[arm], arms["header"], column) == mean_std_text(values, digits), (arm, column)
    for plot in ("val_loss", "collision", "entropy", "train_loss"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{plot}.png)" in report
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["runs"]["fpa_off_seed1"]["val_loss"] == scalars(out / "runs" / "fpa_off_seed1")["val/loss"][-1][1]


def test_finished_runs_are_not_rerun(lambda_study, tiny_corpus, capsys):
    _, out = lambda_study
    before = (out / "report.md").read_text()
    (out / "runs" / "lambda0_1_seed2" / "done.json").unlink()  # as if that run had been interrupted
    stamp = (out / "runs" / "fpa_off_seed1" / "done.json").stat().st_mtime_ns
    capsys.readouterr()
    assert ablate(["lambda", "--tiny", "--out", str(out), "--data-dir", str(tiny_corpus)]) == 0
    printed = capsys.readouterr().out
    assert "3 of 4 runs already done; running 1" in printed and "start lambda0_1_seed2" in printed
    assert (out / "runs" / "fpa_off_seed1" / "done.json").stat().st_mtime_ns == stamp
    assert (out / "report.md").read_text() == before  # the same seed reruns to the same logged numbers
    with pytest.raises(SystemExit, match="holds the lambda study"):
        ablate(["recall", "--tiny", "--out", str(out)])


def test_lr_sweep_report(tmp_path_factory, tiny_corpus):
    rc, out = _run_study(tmp_path_factory, tiny_corpus, "lr-sweep")
    assert rc == 0
    report = (out / "report.md").read_text()
    runs = table_with(report, "run", "capped")
    header = runs["header"]
    capped: dict[str, list[float]] = {}
    for arm in ("fpa_off", "fpa_on", "qk_layernorm"):
        for lr in ("0.001", "0.1"):
            name = f"{arm}_lr{lr}_seed1"
            logged = scalars(out / "runs" / name)
            init, final = logged["val/loss"][0][1], logged["val/loss"][-1][1]
            assert logged["val/loss"][0][0] == 0 and logged["val/loss"][-1][0] == 6
            value = min(init, final) if math.isfinite(final) else init
            capped.setdefault(arm, []).append(value)
            row = runs[name]
            assert cell(row, header, "initial loss") == f"{init:.3f}" and cell(row, header, "final loss") == f"{final:.3f}"
            assert cell(row, header, "capped") == f"{value:.3f}"
            assert cell(row, header, "lowest head entropy") == f"{min(v for _, v in logged['attention/entropy_min']):.3f}"
            assert cell(row, header, "max logit") == f"{max(v for _, v in logged['attention/max_logit']):.2f}"
            assert len(logged["train/lm_loss"]) == 6  # every step logged: what the spike count reads
    stability = table_with(report, "arm", "LR sensitivity")
    for arm, values in capped.items():
        sensitivity = float(np.mean(values) - np.min(values))
        assert cell(stability[arm], stability["header"], "LR sensitivity") == f"{sensitivity:.3f} ± 0.000"
    losses = table_with(report, "arm", "lr 0.1")
    assert cell(losses["qk_layernorm"], losses["header"], "lr 0.1") == f"{capped['qk_layernorm'][1]:.3f} ± 0.000"


def test_recall_report(tmp_path_factory, tiny_corpus):
    from data_prep.synthetic import recall_by_lookup
    from fpa_megatron.studies.recall import read_sequences

    rc, out = _run_study(tmp_path_factory, tiny_corpus, "recall", "--seeds", "1")  # lambda checks 2 seeds
    assert rc == 0
    report = (out / "report.md").read_text()
    runs = table_with(report, "run", "overall")
    header = runs["header"]
    buckets = {"d04-15": (4, 15), "d16-29": (16, 29), "d30-43": (30, 43), "d44-58": (44, 58)}
    # the held-out set, solved here by lookup: how many queries fall in each bucket
    distances = [d for seq in read_sequences(str(out / "data" / "test")) for _, _, d in recall_by_lookup(seq, 4)]
    assert len(distances) == 20 * 4
    per_arm: dict[str, list[float]] = {}
    for arm in ("fpa_off", "lambda0_1"):
        for seed in (1,):
            name = f"{arm}_seed{seed}"
            assert sorted(k for k in runs if k != "header") == ["fpa_off_seed1", "lambda0_1_seed1"]
            recall = json.loads((out / "runs" / name / "recall.json").read_text())
            assert recall["step"] == 6 and sorted(recall["buckets"]) == sorted(buckets)
            for bucket, (lo, hi) in buckets.items():
                result = recall["buckets"][bucket]
                assert result["queries"] == sum(lo <= d <= hi for d in distances)
                if result["queries"]:
                    assert result["accuracy"] == result["correct"] / result["queries"]
                    assert lo <= result["min_distance"] <= result["max_distance"] <= hi
                    assert cell(runs[name], header, f"distance {bucket[1:]}") == f"{result['accuracy']:.3f}"
            overall = recall["overall"]
            assert overall["queries"] == 80 and overall["correct"] == sum(b["correct"] for b in recall["buckets"].values())
            assert cell(runs[name], header, "overall") == f"{overall['accuracy']:.3f}"
            val = scalars(out / "runs" / name)["val/loss"][-1][1]
            assert cell(runs[name], header, "final val loss") == f"{val:.4f}"
            per_arm.setdefault(arm, []).append(overall["accuracy"])
    arms = table_with(report, "arm", "overall")
    for arm, values in per_arm.items():
        assert cell(arms[arm], arms["header"], "overall") == mean_std_text(values, 3)
    assert (out / "plots" / "accuracy_vs_distance.png").is_file()


def test_recall_scorer_counts_only_correct_answers():
    """The scorer with stand-in predictors on real MQAR sequences: one that looks the answer up recalls every
    query, one that always predicts the block's first value exactly the queries for key 1, in their buckets."""
    import torch

    from data_prep.synthetic import MQARSpec, make_mqar, recall_by_lookup
    from fpa_megatron.studies.recall import accuracy_by_bucket, query_table, recalled

    tokens, positions = make_mqar(MQARSpec(seq_length=32, num_pairs=3, vocab_size=64), 30, seed=4)

    def predictor(choose):
        def model(batch, position_ids, attention_mask):
            out = torch.zeros(*batch.shape, 64)
            for b, seq in enumerate(batch.numpy()):
                for p in range(batch.shape[1]):
                    out[b, p, choose(seq, p)] = 1.0
            return out
        return model

    queries = query_table(tokens, 3)
    assert len(queries["row"]) == 90
    oracle = predictor(lambda seq, p: {q: a for q, a, _ in recall_by_lookup(seq, 3)}.get(p, 0))
    assert recalled(oracle, tokens, queries, batch_size=7).all()
    first_value = recalled(predictor(lambda seq, p: int(seq[3])), tokens, queries, batch_size=7)
    key1_distances = positions[:, 0] - 1  # query 0 asks for key 1, which sits at position 1
    assert sorted(queries["distance"][first_value].tolist()) == sorted(key1_distances.tolist())
    result = accuracy_by_bucket(first_value, queries["distance"], [(4, 12), (13, 30)])
    assert result["overall"] == {"accuracy": 30 / 90, "correct": 30, "queries": 90,
                                 "min_distance": int(queries["distance"].min()),
                                 "max_distance": int(queries["distance"].max())}
    near = result["buckets"]["d04-12"]
    assert near["correct"] == int((key1_distances <= 12).sum())
    assert near["queries"] == int((queries["distance"] <= 12).sum())


def test_recall_at_a_longer_sequence_under_context_parallelism(tmp_path_factory, tiny_corpus):
    """`fpa-ablate recall --seq-length 96 --buckets ... --set parallel.context=2 --ranks 2`: every run trains
    under CP2 (its checkpoint says so) on 96-token MQAR sequences and is scored per given distance bucket."""
    from data_prep.synthetic import recall_by_lookup
    from fpa_megatron.studies.recall import read_sequences

    out = tmp_path_factory.mktemp("recall_cp2")
    args = ["recall", "--tiny", "--seeds", "1", "--out", str(out), "--workers", "1", "--ranks", "2",
            "--seq-length", "96", "--set", "parallel.context=2", "--buckets", "4-40", "41-91"]
    assert ablate(args) == 0
    assert json.loads((out / "study.json").read_text()) == {"study": "recall", "scale": "tiny", "seq_length": 96}
    distances = [d for seq in read_sequences(str(out / "data" / "test")) for _, _, d in recall_by_lookup(seq, 4)]
    assert len(distances) == 80 and max(distances) > 60  # beyond what the 64-token study can hold
    buckets = {"d04-40": (4, 40), "d41-91": (41, 91)}
    for name in ("fpa_off_seed1", "lambda0_1_seed1"):
        run = out / "runs" / name
        recall = json.loads((run / "recall.json").read_text())
        assert sorted(recall["buckets"]) == sorted(buckets) and recall["overall"]["queries"] == 80
        for bucket, (lo, hi) in buckets.items():
            assert recall["buckets"][bucket]["queries"] == sum(lo <= d <= hi for d in distances)
        layout = json.loads(next(run.glob("checkpoints/iter_*/layout.json")).read_text())
        assert (layout["context"], layout["world_size"], layout["data"]) == (2, 2, 1)
    report = (out / "report.md").read_text()
    assert "--seq-length 96 --buckets 4-40 41-91" in report and "sequences of 96" in report
    with pytest.raises(SystemExit, match="sequence length 96"):  # one directory, one sequence length
        ablate(["recall", "--tiny", "--out", str(out), "--seq-length", "128"])
