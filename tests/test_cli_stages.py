"""`torchslim stages` lists every registered stage, and one stage's fields with their defaults,
ranges (from the config's declared bounds) and docs (issue 11, point 7)."""

from torchslim.app import cli
from torchslim.app.stages_doc import describe
from torchslim.core.stage import stage_names


def test_stages_lists_every_registered_stage(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["stages"]) == 0
    out = capsys.readouterr().out
    for key, cls in stage_names().items():
        assert key in out and cls.__name__ in out


def test_one_stage_shows_fields_defaults_ranges_docs():
    rows = {r["field"]: r for r in describe("prune")}
    assert rows["sparsity"]["default"] == "0.5" and rows["sparsity"]["range"] == "[0, 1)"
    assert rows["sparsity"]["doc"].startswith("fraction of the selected weights set to zero")
    assert rows["iterations"]["range"] == "[1, 10000]"
    assert rows["finetune"]["default"] == "None"
    quant = {r["field"]: r for r in describe("quantize")}
    assert quant["bits"]["range"] == "[2, 8]" and "activations" in quant["bits"]["doc"]


def test_types_read_as_written(capsys, monkeypatch):
    """The contract's constraints (strict, finite, bounds) are not shown as types, and rich
    does not eat ``[...]`` as markup (before: ``dict[str, float] | None`` printed ``Optional[dict]``)."""
    rows = {r["field"]: r for r in describe("prune")}
    assert rows["per_layer"]["type"] == "dict[str, float] | None"
    assert rows["layers"]["type"] == "LayerSelection" and rows["finetune"]["type"] == "TrainConfig | None"
    assert rows["threshold"]["type"] == "float | None" and rows["threshold"]["range"] == "[0, 1e+09] or null"
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["stages", "quantize"]) == 0
    assert "dict[str, int | None]" in capsys.readouterr().out


def test_unknown_stage_is_one_line(capsys):
    assert cli.main(["stages", "banana"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stage named 'banana'" in err[0]
