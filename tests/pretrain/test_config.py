"""Config files: inheritance, typed overrides, clear errors, and every shipped config resolves."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, config_differences, load_config, to_container, without_runtime_keys
from tests.pretrain.engine_helpers import PAPER_CONFIGS, TOY_CONFIGS

BASELINE_MASKING = {"mscn": ("mscn", "hp"), "adios": ("adios", None)}  # issue 4: (masking.name, strategy)


def _expected_fields(stem: str) -> dict:
    parts = stem.split("_")
    expected = {"method": parts[0], "masking": "saliency" if len(parts) > 1 else "none",
                "strategy": parts[1] if len(parts) > 1 else None, "branch": "key" if parts[-1] == "key" else "query"}
    if len(parts) > 1 and parts[1] in BASELINE_MASKING:
        expected["masking"], expected["strategy"] = BASELINE_MASKING[parts[1]]
        if parts[1] == "adios":
            expected["method"] = stem  # mocov2_adios | simclr_adios
    return expected


@pytest.mark.parametrize("path", PAPER_CONFIGS + TOY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_resolves_to_what_its_name_says(path):
    cfg = load_config(path, ["data.root=/data"])
    expected = _expected_fields(path.stem)
    assert cfg.method == expected["method"]
    assert cfg.name == path.stem
    if expected["masking"] != "none":
        assert (cfg.masking.name, cfg.masking.strategy, cfg.masking.branch) == (
            expected["masking"], expected["strategy"], expected["branch"])
    else:
        assert cfg.masking.name == "none"
    if path.parent.name == "paper":
        assert (cfg.model.arch, cfg.augment.image_size, cfg.train.epochs) == ("resnet50", 224, 200)
        assert cfg.data.batch_size == 256
        if cfg.method == "mocov2":  # SPEC 1 numbers
            assert (cfg.optim.lr, cfg.mocov2.queue_size, cfg.mocov2.momentum, cfg.mocov2.temperature) == (
                0.03, 65536, 0.999, 0.2)
        if cfg.masking.strategy == "hp":
            assert dict(cfg.masking.input_filter) == {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    else:
        assert (cfg.model.arch, cfg.augment.image_size) == ("resnet18", 64)


def test_paper_and_toy_sets_match():
    assert [p.name for p in PAPER_CONFIGS] == [p.name for p in TOY_CONFIGS]
    # MoCo v2 (plain, 3 strategies, 3 key-branch), SimCLR (plain, 3); + MSCN, + ADIOS for each, supervised
    assert len(PAPER_CONFIGS) == 16


def test_base_files_merge_in_order_and_overrides_win(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 5}\noptim: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("optim: {lr: 0.2}\n")
    (tmp_path / "run.yaml").write_text("_base_: [a.yaml, b.yaml]\ndata: {root: /x}\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.root, cfg.name) == (7, 0.2, "/x", "run")
    assert cfg.out_dir == "runs/pretrain/run"


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "epoch"),                 # typo in a key
    (["train.epochs=many"], "epochs"),            # wrong type
    (["mocov2.queue_size=10", "method=simclr"], "mocov2"),  # another method's section
    (["masking.name=saliency", "masking.strategy=fancy"], "masking.strategy"),
    (["masking.name=saliency", "masking.strategy=hp", "saliency.source=frozen"], "saliency.checkpoint"),
    (["optim.name=adam"], "optim.name"),
    (["no_equals_sign"], "key=value"),
    (["train.epochs=2", "masking.query_ratio=[0.1"], "cannot parse the override 'masking.query_ratio=\\[0.1'"),
    (["data.batchsize=3"], "did you mean data.batch_size"),  # a misspelt key: the close match is named
    (["knn.k=0"], "knn.k must be at least 1"),  # k=0 reported a meaningless accuracy
    (["data.limit_train_images=-5"], "data.limit_train_images must be a positive"),
])
def test_bad_keys_and_values_are_named(tmp_path, override, message):
    (tmp_path / "run.yaml").write_text("data: {root: /x}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml", override)


def test_missing_data_root_and_missing_files_are_clear(tmp_path):
    (tmp_path / "run.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="data.root"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "child.yaml").write_text("_base_: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_runtime_keys_do_not_count_as_a_different_run():
    a = to_container(load_config(TOY_CONFIGS[0], ["data.root=/x"]))
    b = to_container(load_config(TOY_CONFIGS[0], ["data.root=/x", "data.num_workers=5", "out_dir=/elsewhere"]))
    c = to_container(load_config(TOY_CONFIGS[0], ["data.root=/x", "optim.lr=0.5"]))
    assert config_differences(without_runtime_keys(a), without_runtime_keys(b)) == []
    assert config_differences(without_runtime_keys(a), without_runtime_keys(c)) == [f"optim.lr: {a['optim']['lr']} -> 0.5"]
