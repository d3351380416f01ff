"""The search report (issue 13 item 4): every trial is a point of the Pareto plot, from a real
(tiny) `torchslim search`, and `torchslim report search.json` writes the same page."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from torchslim.app.search import run_search

    tmp = tmp_path_factory.mktemp("search")
    src = {"task": {"name": "mnist1d", "kwargs": {"num_samples": 1200}},
           "model": {"name": "rescnn1d", "kwargs": {"width": 8}}, "seed": 0, "train": {"epochs": 1},
           "measure": {"batch_size": 16, "threads": 1},
           "search": {"budget": {"macs": "0.6x"}, "method": "random", "trials": 4, "step": 2,
                      "finetune": {"max_steps": 2, "epochs": 1}}}
    (tmp / "search.yaml").write_text(yaml.safe_dump(src))
    assert run_search(tmp / "search.yaml", tmp / "out", log=lambda s: None) == 0
    return tmp / "out"


def test_every_trial_is_a_point_and_the_answer_is_starred(searched):
    from torchslim.app.report.search_report import trials_chart

    summary = json.loads((searched / "search.json").read_text())
    trials = json.loads((searched / "trials.json").read_text())
    assert len(trials) == 4
    ax = trials_chart(trials, summary).axes[0]
    plotted = [(tuple(xy), c.get_label()) for c in ax.collections for xy in c.get_offsets()]
    trial_pts = sorted((round(float(x), 6), round(float(y), 6)) for (x, y), label in plotted if label != "answer")
    assert trial_pts == sorted((round(t["macs_ratio"], 6), round(t["val"], 6)) for t in trials)
    star = [xy for xy, label in plotted if label == "answer"]
    assert [tuple(map(float, s)) for s in star] == [(summary["best"]["macs_ratio"], summary["best"]["val"])]
    assert summary["best"]["macs_ratio"] <= 0.6 + 1e-9  # the answer holds the budget line drawn at 0.6


def test_report_page_written_by_search_and_by_torchslim_report(searched, tmp_path):
    from torchslim.app.report.html import write_report

    page = (searched / "report.html").read_text()
    assert page.count("<svg") == 1 and "<script" not in page
    trials = json.loads((searched / "trials.json").read_text())
    assert page.count("<tr><td>") == len(trials)  # one table row per trial
    again = write_report(searched / "search.json", tmp_path / "r.html")
    assert again.read_text().count("<tr><td>") == len(trials)
    assert (searched / "search-pareto.png").stat().st_size > 1000
