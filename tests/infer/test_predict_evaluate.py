"""predict and evaluate on a tiny model, through the command line."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from hkd4vlm.cli import main
from hkd4vlm.data.layout import read_split
from hkd4vlm.eval.report import evaluate_predictions, read_predictions
from hkd4vlm.models.presets import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=1)


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
def test_predict_writes_the_scorers_shape(tmp_path, tiny_model, synth_root, task):
    out = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(main, ["predict", "--model", str(tiny_model), "--data", str(synth_root), "--task", task,
                                    "--split", "test", "--out", str(out), "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    records = read_split(synth_root, task, "test").records
    assert [r["image"] for r in rows] == [r.image_id for r in records]
    for row, rec in zip(rows, records):
        assert {"image", "question", "answer", "choice", "pred_ans", "status", "probs"} <= set(row)
        assert row["choice"] == rec.correct_choice and row["answer"] == rec.correct_answer
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        best = max(row["probs"], key=row["probs"].get)
        assert row["pred_ans"] == f"{best}: {rec.options[rec.letters.index(best)]}"
        assert row["status"] == ("correct" if best == rec.correct_choice else "wrong")


def test_evaluate_reports_metrics_and_plot(tmp_path):
    rows = [  # gold A A B C, predicted A B B B: accuracy 0.5
        {"image": "1.jpg", "choice": "A", "pred_ans": "A: x", "probs": {"A": 0.9, "B": 0.1, "C": 0.0, "D": 0.0}},
        {"image": "2.jpg", "choice": "A", "pred_ans": "B: y", "probs": {"A": 0.3, "B": 0.7, "C": 0.0, "D": 0.0}},
        {"image": "3.jpg", "choice": "B", "pred_ans": "B: y", "probs": {"A": 0.2, "B": 0.6, "C": 0.2, "D": 0.0}},
        {"image": "4.jpg", "choice": "C", "pred_ans": "B: y", "probs": {"A": 0.0, "B": 0.5, "C": 0.5, "D": 0.0}},
    ]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["prediction_share"] == {"A": 0.25, "B": 0.75, "C": 0.0, "D": 0.0}
    assert m["per_letter"]["B"]["precision"] == pytest.approx(1 / 3) and m["per_letter"]["B"]["recall"] == 1.0
    assert m["confusion_matrix"]["matrix"][0] == [1, 1, 0, 0]
    # ECE, one bin per prediction here: |1-0.9|/4 + |0-0.7|/4 + |1-0.6|/4 + |0-0.5|/4
    assert m["ece"] == pytest.approx((0.1 + 0.7 + 0.4 + 0.5) / 4)
    with Image.open(tmp_path / "metrics_confusion.png") as im:
        assert im.size[0] > 50


def test_evaluate_names_the_bad_line(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"image": "1.jpg", "choice": "A", "pred_ans": "A: x"}\n{"image": "2.jpg", "choice": "A"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: record '2\.jpg' lacks field\(s\) \['pred_ans'\]"):
        read_predictions(preds)
    preds.write_text('{"image": "1.jpg", "choice": "A", "pred_ans": "A: x"}\nnot json\n')
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    assert res.exit_code != 0 and "p.jsonl:2: not valid JSON" in res.output


def test_evaluate_refuses_unlabelled_predictions():
    with pytest.raises(ValueError, match="no record has a gold letter"):
        evaluate_predictions([{"image": "1.jpg", "choice": None, "pred_ans": "A: x"}])




def test_predict_with_mapping_shifts_writes_agreement(tmp_path, tiny_model, synth_root):
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(tiny_model), "--data", str(synth_root), "--task", "factuality", "--split", "test",
            "--out", str(out), "--limit", "4"]
    res = CliRunner().invoke(main, args + ["--shifts", "all", "--aggregate", "vote"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["agreement"] in (0.25, 0.5, 0.75, 1.0)
        assert row["pred_letter"] == max(row["probs"], key=row["probs"].get) or row["probs"][row["pred_letter"]] == max(row["probs"].values())
    res = CliRunner().invoke(main, args + ["--shifts", "zero"])
    assert res.exit_code != 0 and "--shifts" in res.output
