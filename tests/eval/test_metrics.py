import pytest

from hkd4vlm.eval.metrics import classification_report, confusion_matrix, expected_calibration_error

GOLD = ["A", "A", "B", "C", "D", "D"]
PRED = ["A", "B", "B", "C", "A", "D"]


def test_per_letter_and_averages_by_hand():
    r = classification_report(GOLD, PRED, letters="ABCD")
    # A: tp=1 fp=1 fn=1 -> P=R=F1=0.5; B: tp=1 fp=1 fn=0 -> P=.5 R=1 F1=2/3
    # C: 1/1/1; D: tp=1 fp=0 fn=1 -> P=1 R=.5 F1=2/3
    assert r["per_letter"]["A"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_letter"]["B"]["f1"] == pytest.approx(2 / 3)
    assert r["per_letter"]["D"]["precision"] == 1.0 and r["per_letter"]["D"]["recall"] == 0.5
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1 + 2 / 3) / 4)
    assert r["micro_f1"] == pytest.approx(4 / 6)
    assert r["prediction_share"] == {"A": 2 / 6, "B": 2 / 6, "C": 1 / 6, "D": 1 / 6}


def test_micro_f1_counts_an_unparsed_prediction_as_a_miss():
    r = classification_report(["A", "B"], ["A", "?"], letters="AB")
    # tp=1, fp=0 ('?' is no letter), fn=1 -> 2/(2+0+1)
    assert r["micro_f1"] == pytest.approx(2 / 3)
    assert r["accuracy"] == 0.5


def test_confusion_matrix_rows_are_gold():
    m = confusion_matrix(GOLD, PRED, "ABCD")
    assert m == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]


def test_ece_by_hand():
    # bin 0.9: two predictions at 0.95, one right -> |0.5-0.95| * 2/4; bin 0.6: two at 0.6, both right -> |1-0.6| * 2/4
    assert expected_calibration_error([0.95, 0.95, 0.6, 0.6], [True, False, True, True]) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.4
    )
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_report(["A", "B"], ["A"])
