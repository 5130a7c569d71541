"""predict and evaluate on a tiny model, through the command line."""

import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from hkd4vlm.cli import main
from hkd4vlm.data.layout import read_split
from hkd4vlm.eval.report import evaluate_predictions, read_predictions
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=1)


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
def test_predict_writes_the_scorers_shape(tmp_path, tiny_model, synth_root, task):
    out = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            str(tiny_model),
            "--data",
            str(synth_root),
            "--task",
            task,
            "--split",
            "test",
            "--out",
            str(out),
            "--batch-size",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = read_split(synth_root, task, "test").records
    assert [r["image"] for r in rows] == [r.image_id for r in records]
    for row, rec in zip(rows, records):
        assert {"image", "question", "answer", "choice", "pred_ans", "status", "correct", "probs"} <= set(row)
        assert row["choice"] == rec.correct_choice and row["answer"] == rec.correct_answer
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        best = max(row["probs"], key=row["probs"].get)
        assert row["pred_ans"] == f"{best}: {rec.options[rec.letters.index(best)]}"
        # status is the inference status (the peer scorers' convention); correctness has its own field
        assert row["status"] == "success" and row["error"] is None
        assert row["correct"] is (best == rec.correct_choice)


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
    args = [
        "predict",
        "--model",
        str(tiny_model),
        "--data",
        str(synth_root),
        "--task",
        "factuality",
        "--split",
        "test",
        "--out",
        str(out),
        "--limit",
        "4",
    ]
    res = CliRunner().invoke(main, args + ["--shifts", "all", "--aggregate", "vote"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["agreement"] in (0.25, 0.5, 0.75, 1.0)
        assert row["pred_letter"] == max(row["probs"], key=row["probs"].get) or row["probs"][row["pred_letter"]] == max(
            row["probs"].values()
        )
    res = CliRunner().invoke(main, args + ["--shifts", "zero"])
    assert res.exit_code != 0 and "--shifts" in res.output


def peer_score(lines: list[dict]) -> dict:
    """A scorer written to the other teams' public convention: ``status`` is the inference status, a line
    whose status is not "success" counts as failed, the predicted letter is what ``pred_ans`` starts with;
    accuracy and macro-F1 over the letters A-D."""
    gold, pred = [], []
    for item in lines:
        gold.append(item["choice"])
        pred.append(item["pred_ans"].split(":")[0].strip() if item["status"] == "success" else "failed")
    f1s = []
    for letter in "ABCD":
        tp = sum(g == p == letter for g, p in zip(gold, pred))
        fp = sum(p == letter != g for g, p in zip(gold, pred))
        fn = sum(g == letter != p for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold), "macro_f1": sum(f1s) / 4}


def test_a_peer_scorer_reads_our_predictions_as_we_do(tmp_path, tiny_model, synth_root):
    out = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            str(tiny_model),
            "--data",
            str(synth_root),
            "--task",
            "hallucination",
            "--split",
            "test",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ours = evaluate_predictions(read_predictions(out))
    theirs = peer_score(lines)
    assert ours["accuracy"] > 0  # a scorer that counted every line as failed would say 0
    assert theirs["accuracy"] == pytest.approx(ours["accuracy"])
    assert theirs["macro_f1"] == pytest.approx(ours["macro_f1"])
    assert sum(line["correct"] for line in lines) / len(lines) == pytest.approx(ours["accuracy"])
    assert f"accuracy {ours['accuracy']:.4f}" in res.output


def test_an_unscorable_record_is_an_error_line_without_nan(tmp_path, synth_root):
    from hkd4vlm.infer.predict import to_prediction, write_jsonl

    records = read_split(synth_root, "factuality", "test").records[:2]
    preds = [
        to_prediction(records[0], [float("nan")] * len(records[0].choices)),
        to_prediction(records[1], [0.7] + [0.3 / (len(records[1].choices) - 1)] * (len(records[1].choices) - 1)),
    ]
    path = write_jsonl(preds, tmp_path / "p.jsonl")

    def no_nan(token):
        raise AssertionError(f"{token} written to a predictions file")

    lines = [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]
    assert lines[0]["status"] == "error" and "non-finite" in lines[0]["error"]
    assert lines[0]["probs"] is None and lines[0]["correct"] is False and lines[0]["pred_ans"] == ""
    assert lines[1]["status"] == "success" and lines[1]["pred_letter"] == records[1].letters[0]
    report = evaluate_predictions(read_predictions(path))
    # the unscored line counts as wrong, for us as for a peer scorer
    assert report["errors"] == 1 and report["n"] == 2
    assert report["accuracy"] == pytest.approx(peer_score(lines)["accuracy"])


GOOD = {"image": "1.jpg", "choice": "A", "pred_ans": "A: x", "pred_letter": "A", "probs": {"A": 0.9, "B": 0.1}}
MALFORMED = {  # a field of line 2 -> the field the error must name
    "choice as list": ({"choice": ["A"]}, "choice"),
    "probs as list": ({"probs": [0.9, 0.1]}, "probs"),
    "pred_letter int": ({"pred_letter": 1}, "pred_letter"),
    "word read as a letter": ({"pred_ans": "Zebra: x", "pred_letter": None}, "pred_ans"),
    "NaN probability": ({"probs": {"A": float("nan"), "B": 0.1}}, "probs.A"),
    "probability above 1": ({"probs": {"A": 1.5, "B": 0.1}}, "probs.A"),
    "probability as text": ({"probs": {"A": "0.9", "B": 0.1}}, "probs.A"),
    "pred_letter against pred_ans": ({"pred_letter": "B"}, "pred_letter"),
    "unknown status": ({"status": "maybe"}, "status"),
    "image as number": ({"image": 7}, "image"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_evaluate_names_the_line_and_field_of_a_malformed_prediction(tmp_path, case):
    change, field = MALFORMED[case]
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "image": "2.jpg", **change}) + "\n")
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: .*field '{re.escape(field)}'"):
        read_predictions(preds)
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"field '{field}'" in res.output and not (tmp_path / "m.json").exists()


def test_evaluate_writes_its_metrics_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves the previous metrics file whole."""
    import errno
    import pathlib

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "metrics.json"
    out.write_text('{"accuracy": "the previous run"}')
    real = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if "metrics.json" in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(out)])
    assert res.exit_code == 1 and "No space left on device" in res.output
    assert out.read_text() == '{"accuracy": "the previous run"}'
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text())["accuracy"] == 1.0


def test_evaluate_names_a_file_that_is_not_text_or_nested_too_deeply(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and "p.jsonl: not UTF-8" in res.output
    preds.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    assert (
        res.exit_code == 1
        and isinstance(res.exception, SystemExit)
        and "p.jsonl:2: JSON that cannot be read" in res.output
    )
    preds.write_text(json.dumps(GOOD) + "\n" + '{"image": ' + "9" * 5000 + "}\n")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    assert (
        res.exit_code == 1
        and isinstance(res.exception, SystemExit)
        and "p.jsonl:2: JSON that cannot be read" in res.output
    )
    # a line separator inside a text field is part of the line, not the end of it
    preds.write_text(json.dumps({**GOOD, "question": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert read_predictions(preds)[0]["question"] == "a\u2028b"


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_read_shifts_alike(command):
    import click

    from hkd4vlm.infer.msei import parse_shifts

    option = next(p for p in main.commands[command].params if p.name == "shifts")
    for text, want in [("1", 1), ("3", 3), (" 12", 12), ("all", "all"), ("ALL", "all")]:
        assert option.type.convert(text, option, None) == want == parse_shifts(text)
    for bad in ("0", "-2", "zero", "", "2.5"):
        with pytest.raises(click.BadParameter, match="shifts"):
            option.type.convert(bad, option, None)


def test_predict_with_one_shift_is_one_plain_pass(tmp_path, tiny_model, synth_root, monkeypatch):
    import hkd4vlm.infer.predict as predict_module

    def no_shifts(*a, **kw):
        raise AssertionError("one shift must not go through mapping-shift scoring")

    monkeypatch.setattr(predict_module, "score_shifts", no_shifts)
    out = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            str(tiny_model),
            "--data",
            str(synth_root),
            "--task",
            "factuality",
            "--out",
            str(out),
            "--limit",
            "2",
            "--shifts",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["agreement"] for line in out.read_text().splitlines()] == [None, None]


def _no_traceback(res, code, *words):
    assert res.exit_code == code and isinstance(res.exception, SystemExit), (res.exception, res.output)
    for w in words:
        assert w in res.output, res.output
    assert "Traceback" not in res.output


def test_predict_and_evaluate_refuse_an_output_that_is_an_input(tmp_path, tiny_model, synth_root):
    import shutil

    from hkd4vlm.data.layout import split_file

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    split = split_file(data, "factuality", "test")
    before = split.read_bytes()
    base = ["predict", "--model", str(tiny_model), "--data", str(data), "--task", "factuality", "--limit", "1"]
    res = CliRunner().invoke(main, [*base, "--out", str(split)])
    _no_traceback(res, 2, "--out", "split file read", "overwrite an input")
    other = split_file(data, "factuality", "train")  # another file of the dataset
    res = CliRunner().invoke(main, [*base, "--out", str(other)])
    _no_traceback(res, 2, "--out", "a file of the dataset")
    assert split.read_bytes() == before and json.loads(other.read_text())
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(GOOD) + "\n")
    for args in (["--out", str(preds)], ["--out", str(tmp_path / "m.json"), "--plot", str(preds)]):
        res = CliRunner().invoke(main, ["evaluate", str(preds), *args])
        _no_traceback(res, 2, "predictions file", "overwrite an input")
    assert preds.read_text() == json.dumps(GOOD) + "\n"


def test_evaluate_refuses_an_unknown_plot_format_before_writing_anything(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(GOOD) + "\n")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json"), "--plot", "x.xyz"])
    _no_traceback(res, 2, "--plot", "'.xyz'", ".png")
    assert not (tmp_path / "m.json").exists()


def test_a_full_disk_is_one_message_naming_the_output_and_leaves_no_temporary_file(
    tmp_path, tiny_model, synth_root, monkeypatch
):
    import errno
    import pathlib

    import matplotlib.figure

    real_write = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):  # half the text, then ENOSPC naming no file (as write(2) does)
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    def plot_disk_full(self, fname, *args, **kwargs):
        pathlib.Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "preds.jsonl"
    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    args = ["--data", str(synth_root), "--task", "factuality", "--limit", "2", "--out", str(out)]
    res = CliRunner().invoke(main, ["predict", "--model", str(tiny_model), *args])
    _no_traceback(res, 1, f"{out}: No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", real_write)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(GOOD) + "\n")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", plot_disk_full)
    plot = tmp_path / "c.png"
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json"), "--plot", str(plot)])
    _no_traceback(res, 1, f"{plot}: No space left on device")
    assert not out.exists() and not plot.exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_predict_refuses_a_record_over_the_token_bound_and_an_empty_split(tmp_path, tiny_model, synth_root):
    import shutil

    from hkd4vlm.data.layout import split_file
    from hkd4vlm.infer.predict import MAX_RECORD_TOKENS

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    path = split_file(data, "factuality", "test")
    records = json.loads(path.read_text())
    records[1]["context"] = " ".join(["Tom drew the red circle."] * 30)  # ~150 tokens, far under the char limit
    path.write_text(json.dumps(records))
    out = tmp_path / "p.jsonl"
    base = ["predict", "--model", str(tiny_model), "--data", str(data), "--task", "factuality", "--out", str(out)]
    res = CliRunner().invoke(main, [*base, "--max-record-tokens", "100"])
    _no_traceback(res, 1, str(path), f"record {records[1]['image_id']}", "field 'context'", "over the limit of 100")
    assert not out.exists()
    assert CliRunner().invoke(main, [*base, "--limit", "2"]).exit_code == 0  # under the default bound
    default = next(p for p in main.commands["predict"].params if p.name == "max_record_tokens").default
    assert default == MAX_RECORD_TOKENS
    path.write_text("[]")
    res = CliRunner().invoke(main, base)
    _no_traceback(res, 1, str(path), "no records")


def test_evaluate_refuses_a_record_predicted_twice(tmp_path):
    preds = tmp_path / "p.jsonl"
    other = {**GOOD, "image": "2.jpg"}
    preds.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, other, GOOD)))
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "m.json")])
    _no_traceback(res, 1, f"{preds}:3", "'1.jpg' is predicted again (first at line 1)")
    assert not (tmp_path / "m.json").exists()
    # the same image under two tasks is two records
    preds.write_text("".join(json.dumps(r) + "\n" for r in ({**GOOD, "task": "factuality"}, {**GOOD, "task": "x"})))
    assert len(read_predictions(preds)) == 2
