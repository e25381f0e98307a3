"""Results accumulation, JSON layout, table and TensorBoard scalars."""

import json

import pytest

from fovlm.eval.report import MultipleChoiceReport, markdown_table


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def _report():
    report = MultipleChoiceReport()
    # coarse_fine: 2 of 3 right; coarse_only: 1 of 3 right
    for mode, preds in (("coarse_fine", (1, 0, 2)), ("coarse_only", (0, 0, 1))):
        for (cat, answer), pred in zip((("motion", 1), ("motion", 0), ("colour", 3)), preds):
            report.update("toy", mode, cat, pred, answer)
    report.update_loss("coarse_fine", "openvid", 6.0, 4)
    report.update_loss("coarse_fine", "openvid", 2.0, 4)
    return report


def test_results_layout_and_accuracy(tmp_path):
    report = _report()
    results = json.loads(report.write_json(tmp_path / "r" / "results.json").read_text())
    cf = results["toy"]["coarse_fine"]
    assert (cf["correct"], cf["total"]) == (2, 3) and cf["accuracy"] == pytest.approx(2 / 3)
    assert cf["per_category"]["motion"]["accuracy"] == 1.0 and cf["per_category"]["colour"]["accuracy"] == 0.0
    assert results["toy"]["coarse_only"]["accuracy"] == pytest.approx(1 / 3)
    assert results["val_loss"]["coarse_fine"]["openvid"] == pytest.approx(1.0)


def test_table_and_tensorboard():
    report = _report()
    text = report.table(per_category=True)
    assert "66.7" in text and "33.3" in text and "colour" in text and "val loss openvid" in text
    writer = _Writer()
    report.log_to(writer, step=7)
    assert writer.scalars["eval/toy/coarse_fine/accuracy"][0] == pytest.approx(2 / 3)
    assert writer.scalars["eval/toy/coarse_only/motion"] == (0.5, 7)
    assert writer.scalars["val/loss/coarse_fine/openvid"][0] == pytest.approx(1.0)
    md = markdown_table(report.compute())
    assert "| toy | 33.3 | 66.7 | 3 |" in md


def test_attention_shares_are_averaged_and_reported_beside_the_accuracy(tmp_path):
    report = _report()
    for mode, shares in (("coarse_fine", (0.5, 0.7, float("nan"))), ("coarse_only", (0.2, 0.3, 0.1))):
        for cat, share in zip(("motion", "motion", "colour"), shares):
            report.update_share("toy", mode, cat, share)
    results = report.compute()
    assert results["toy"]["coarse_fine"]["attention_share"] == pytest.approx(0.6)  # the nan is left out
    assert "attention_share" not in results["toy"]["coarse_fine"]["per_category"]["colour"]
    assert results["toy"]["coarse_only"]["per_category"]["colour"]["attention_share"] == pytest.approx(0.1)
    text = report.table(per_category=True)
    assert "toy attention share" in text and "60.0" in text and "20.0" in text
    writer = _Writer()
    report.log_to(writer)
    assert writer.scalars["eval/toy/coarse_fine/attention_share"][0] == pytest.approx(0.6)
    assert writer.scalars["eval/toy/coarse_only/motion/attention_share"][0] == pytest.approx(0.25)
    assert "| toy: attention share in the answer region (%) | 20.0 | 60.0 | |" in markdown_table(results)


def test_rejects_out_of_range_index():
    with pytest.raises(ValueError, match="out of range"):
        MultipleChoiceReport(num_classes=4).update("toy", "coarse_fine", None, 4, 0)
