"""``python -m pretrain.bench``: runs real steps at tiny scale, writes every field, resumes, refuses bad input.

No timing assertions: speed targets are what the benchmark reports, not what a test can check.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain.bench.__main__ import bn_splits, main
from pretrain.bench.masking_speed import masking_benchmark
from pretrain.bench.steps import ENCODER_PHASES, PHASES
from pretrain.bench.variants import parse_variants

VARIANTS = "plain_passes,hp,hp_frozen_cache"


def _args(toy_world, out, *extra):
    return ["--scale", "toy", "--size", "32", "--batch", "4", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--variants", VARIANTS, "--data-root", str(toy_world / "imagenet100"), "--masking-batch", "4",
            "--masking-size", "32", "--masking-repeats", "1", "--loader-batches", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_run(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(_args(toy_world, out))
    return code, out, json.loads(out.read_text())


def test_cli_writes_every_field_for_every_variant(tiny_run):
    code, _, result = tiny_run
    assert code == 0
    assert result["format"] == "masked-ssl-bench/v1"
    assert set(result["steps"]) == set(VARIANTS.split(","))
    for name, step in result["steps"].items():
        mean = step["mean"]
        assert set(PHASES) | {"total", "encoder", "other"} <= set(mean), name
        assert all(value >= 0 for key, value in mean.items() if key != "other"), name
        assert sum(mean[k] for k in PHASES) <= mean["total"] * 1.001, "the phases happen inside the step"
        assert mean["encoder"] == pytest.approx(sum(mean[k] for k in ENCODER_PHASES))
        assert len(step["per_step"]) == step["steps"] == 1
        assert step["images_per_s"] == pytest.approx(step["batch"] / mean["total"])
        assert step["peak_memory_bytes"] > 0 and step["peak_memory_kind"] == "cpu_peak_rss"
        assert (step["arch"], step["image_size"], step["batch"]) == ("resnet18", 32, 4)
    steps = result["steps"]
    reference, hp, cached = steps["plain_passes"], steps["hp"], steps["hp_frozen_cache"]
    assert reference["masking"] == "none" and reference["mean"]["masking"] == 0.0
    assert reference["mean"]["hard_negative_forward"] > 0, "the reference runs the hard-negative pass too"
    assert reference["hard_negatives"] == hp["hard_negatives"] == 1
    assert hp["mean"]["masking"] > 0 and hp["mean"]["saliency"] > 0 and hp["mean"]["input_filter"] > 0
    assert (hp["saliency_source"], hp["strategy"]) == ("momentum", "hp")
    assert cached["saliency_source"] == "frozen"


def test_overheads_and_targets_are_consistent(tiny_run):
    _, _, result = tiny_run
    base = result["steps"]["plain_passes"]["mean"]["total"]
    for name in ("hp", "hp_frozen_cache"):
        mean, over = result["steps"][name]["mean"], result["overhead"][name]
        assert over["overhead"] == pytest.approx((mean["saliency"] + mean["masking"]) / base)
        assert over["overhead_with_filter"] >= over["overhead"]
        assert over["target"] == 0.05 and over["meets_target"] == (over["overhead"] <= 0.05)
    assert result["overhead"]["plain_passes"]["overhead"] == 0.0
    names = [t["target"] for t in result["targets"]]
    assert any("hp:" in n for n in names) and any("loop reference" in n for n in names)
    assert any("loader" in n for n in names)
    assert all(isinstance(t["pass"], bool) for t in result["targets"])


def test_masking_part_agrees_with_the_reference_and_loader_part_reads_jpegs(tiny_run):
    _, _, result = tiny_run
    masking = result["masking"]
    assert masking["all_equal"] and len(masking["rows"]) == 6
    assert {(r["strategy"], r["kind"]) for r in masking["rows"]} == {
        (s, k) for s in ("hp", "blur", "mean") for k in ("query", "negative")}
    for row in masking["rows"]:
        assert row["speedup"] == pytest.approx(row["reference_s"] / row["batched_s"])
        assert 0 < row["masked_fraction"] < 1
    loader = result["loader"]
    assert loader["images_per_s"] > 0 and loader["num_workers"] == 1 and loader["image_size"] == 32
    check = result["loader_check"]
    assert check["meets_target"] == (check["loader_images_per_s"] >= check["step_images_per_s"])


def test_batched_masking_equals_the_loop_reference_on_equal_224px_cells():
    result = masking_benchmark(batch=2, size=224, repeats=1, reference_repeats=1)
    assert result["shape"] == [2, 3, 224, 224]
    assert result["all_equal"], [r for r in result["rows"] if not r["equal"]]


def test_rerun_resumes_and_other_settings_are_refused(tiny_run, toy_world, capsys):
    _, out, first = tiny_run
    assert main(_args(toy_world, out)) == 0
    again = json.loads(out.read_text())
    assert again["steps"]["hp"]["per_step"] == first["steps"]["hp"]["per_step"], "measured variants are kept"
    capsys.readouterr()
    assert main(_args(toy_world, out, "--steps", "2")) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads(out.read_text()) == again, "a refused run leaves the results alone"


def test_bad_input_is_one_clear_error(toy_world, tmp_path, capsys):
    assert main(["--variants", "hp,bogus", "--data-root", str(toy_world / "imagenet100"),
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "unknown variant(s) ['bogus']" in capsys.readouterr().err
    assert main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.json")]) == 2
    assert "--data-root" in capsys.readouterr().err
    # a bad --set fails once, before any variant runs, and writes no result file
    assert main(["--data-root", str(toy_world / "imagenet100"), "--set", "train.epoch=3", "--parts", "steps",
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_help_and_helpers():
    done = subprocess.run([sys.executable, "-m", "pretrain.bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "plain_passes" in done.stdout and "--threads" in done.stdout
    assert [v.name for v in parse_variants("hp, plain")] == ["hp", "plain"]
    assert len(parse_variants("all")) == 8
    for batch in (2, 4, 6, 8, 64, 256):
        splits = bn_splits(batch)
        assert batch % splits == 0 and (batch // splits >= 2 or splits == 1)
    assert bn_splits(64) == 8


def test_reference_variant_encodes_unmasked_key_copies():
    from types import SimpleNamespace

    from pretrain.bench.steps import UnmaskedExtraPasses

    key = torch.randn(3, 3, 8, 8)
    inner = SimpleNamespace(alpha=2.0, prepare=lambda *a, **k: SimpleNamespace(key=key, negatives=None))
    prepared = UnmaskedExtraPasses(inner, 2).prepare(None, None)
    assert torch.equal(prepared.negatives, key.repeat_interleave(2, 0))
    assert UnmaskedExtraPasses(inner, 2).alpha == 2.0
