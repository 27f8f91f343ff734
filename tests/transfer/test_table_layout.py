"""Which table row a model lands in, and the paper's row order (no files, no pandas rendering)."""

from __future__ import annotations

import pandas as pd
import pytest

from transfer.table_layout import (
    DEFAULT_PAPER_CSV,
    TABLES,
    ModelIdentity,
    PaperReferenceError,
    layout_rows,
    load_paper_reference,
)

PAPER = load_paper_reference()
PAPER_FRAME = pd.read_csv(DEFAULT_PAPER_CSV, dtype=str, keep_default_na=False)


def identity(base, masking="none", strategy=None, branch=None, name=None, **fields) -> ModelIdentity:
    model = {
        "base": base,
        "masking": masking,
        "strategy": strategy,
        "mask_branch": branch,
        "arch": "resnet18",
        "input_filter": {"name": "none"},
        "name": name or f"{base}-{masking}-{strategy}-{branch}",
    }
    model.update(fields)
    return ModelIdentity.from_model(model)


def identity_for_paper_row(row) -> ModelIdentity:
    """The model a user would train to reproduce a published row."""
    if row.strategy in ("mscn", "adios"):
        return identity(row.base, row.strategy, "hp" if row.strategy == "mscn" else None, row.mask_branch)
    if row.strategy:
        return identity(row.base, "saliency", row.strategy, row.mask_branch)
    return identity(row.base)


def test_reference_csv_holds_the_published_tables():
    assert {key: len(rows) for key, rows in PAPER.items()} == {"A": 13, "B": 13, "C": 7}
    assert len(PAPER_FRAME) == 13 * 3 + 13 * 9 + 7
    assert PAPER["A"][0].values == {
        "imagenet100_top1": 82.72,
        "caltech101_acc": 21.99,
        "flowers102_acc": 20.29,
    }
    assert PAPER["B"][4].method == "+ Ours (High-pass filtering)" and PAPER["B"][4].values["voc_AP"] == 50.89
    assert [(row.strategy, row.mask_branch) for row in PAPER["C"]][1:3] == [("hp", "key"), ("hp", "query")]


@pytest.mark.parametrize(
    "table, position",
    [(key, i) for key, rows in PAPER.items() for i in range(len(rows))],
)
def test_every_paper_row_is_filled_by_its_model(table, position):
    paper_row = PAPER[table][position]
    model = identity_for_paper_row(paper_row)
    rows = layout_rows(TABLES[table], [model], PAPER[table])
    filled = [row for row in rows if row.identity == model]
    assert len(filled) == 1
    assert filled[0].paper is paper_row and filled[0].label == paper_row.method
    # the row keeps the paper's position among the paper rows
    assert [row.paper for row in rows if row.paper] == PAPER[table]


def test_rows_follow_the_papers_order_then_extras_then_third_party():
    models = [
        identity("external", name="zz-torchvision"),
        identity("mocov2", "saliency", "blur", "both"),
        identity("simclr", "saliency", "mean", "query"),
        identity("random"),
        identity("mocov2"),
        identity("supervised"),
        identity("mocov2", "saliency", "hp", "key"),
    ]
    rows = layout_rows(TABLES["A"], models, PAPER["A"])
    labels = [row.label for row in rows]
    assert labels == [
        "Supervised",
        "Random init",
        "MoCov2",
        "+ MSCN",
        "+ ADIOS",
        "+ Ours (High-pass filtering)",
        "+ Ours (Strong blurring)",
        "+ Ours (Mean filling)",
        "+ Ours (High-pass filtering), mask on key",
        "+ Ours (Strong blurring), mask on both",
        "SimCLR",
        "+ MSCN",
        "+ ADIOS",
        "+ Ours (High-pass filtering)",
        "+ Ours (Strong blurring)",
        "+ Ours (Mean filling)",
        "zz-torchvision",
    ]
    assert [row.group for row in rows][:2] == ["reference", "reference"] and rows[-1].group == "external"
    assert rows[8].paper is None and rows[9].paper is None  # non-paper settings are not given paper numbers

    table_c = layout_rows(TABLES["C"], models, PAPER["C"])
    assert [(row.label, row.branch) for row in table_c] == [
        ("Random init", ""),
        ("MoCov2", ""),
        ("+ Ours (High-pass filtering)", "key"),
        ("+ Ours (High-pass filtering)", "query"),
        ("+ Ours (Strong blurring)", "key"),
        ("+ Ours (Strong blurring)", "query"),
        ("+ Ours (Mean filling)", "key"),
        ("+ Ours (Mean filling)", "query"),
        ("+ Ours (Strong blurring)", "both"),
        ("zz-torchvision", ""),
    ]  # supervised and SimCLR query-only rows are not part of the mask-branch ablation


def test_identity_normalises_meaningless_fields():
    plain = identity("mocov2", "none", strategy="hp", branch="query", name="m")
    assert (plain.strategy, plain.mask_branch, plain.paper_key) == (None, None, ("mocov2", None, None))
    masked = identity("simclr", "saliency", "blur", None)
    assert masked.mask_branch == "query" and masked.paper_key == ("simclr", "blur", "query")
    assert identity("mocov2", "mscn", "hp", "query").paper_key == ("mocov2", "mscn", "query")


def test_models_sharing_a_paper_row_keep_separate_labelled_rows():
    a = identity("mocov2", "saliency", "hp", "query", name="hp-momentum", saliency_source="momentum")
    b = identity("mocov2", "saliency", "hp", "query", name="hp-supervised", saliency_source="supervised_r50")
    rows = [row for row in layout_rows(TABLES["A"], [a, b], PAPER["A"]) if row.identity in (a, b)]
    assert len(rows) == 2
    assert {row.label for row in rows} == {
        "+ Ours (High-pass filtering) [saliency source=momentum, model=hp-momentum]",
        "+ Ours (High-pass filtering) [saliency source=supervised_r50, model=hp-supervised]",
    }
    assert all(row.paper is not None for row in rows)  # both compare to the published number


def test_unknown_settings_are_labelled_from_their_fields():
    odd = identity("simclr", "saliency", "noise", "query")
    rows = layout_rows(TABLES["B"], [odd], PAPER["B"])
    (row,) = [r for r in rows if r.identity == odd]
    assert row.label == "+ Ours (strategy noise)" and row.group == "simclr" and row.paper is None


def test_missing_or_malformed_paper_csv_is_one_clear_error(tmp_path):
    with pytest.raises(PaperReferenceError, match="--paper"):
        load_paper_reference(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("table,method,value\nA,x,1\n")
    with pytest.raises(PaperReferenceError, match="missing columns"):
        load_paper_reference(bad)
