import json
import re

import pytest

from conftest import REPO, load_test_config
from launch.config import ConfigError, load_config


def test_tiny_config_loads_and_overrides_are_typed():
    config = load_test_config("configs/two_tower.py:tiny", "train.steps=7", "optimizer.learning_rate=1",
                              "train.compute_dtype=bfloat16", "sharding.rules.embed=")
    assert config.train.steps == 7
    assert isinstance(config.optimizer.learning_rate, float) and config.optimizer.learning_rate == 1.0
    assert config.train.compute_dtype == "bfloat16"
    assert config.sharding.rules.embed == ""


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'.*'train\.steps'"):
        load_test_config("configs/two_tower.py:tiny", "train.stpes=3")


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.steps=three.*int"):
        load_test_config("configs/two_tower.py:tiny", "train.steps=three")
    with pytest.raises(ConfigError, match=r"train\.batch_size=2\.5.*int"):
        load_test_config("configs/two_tower.py:tiny", "train.batch_size=2.5")


def test_invalid_values_are_rejected_before_compiling():
    with pytest.raises(ConfigError, match="divisible"):
        load_test_config("configs/two_tower.py:tiny", "train.microbatches=5")
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        load_test_config("configs/two_tower.py:tiny", "sharding.rules.mlp=model")
    with pytest.raises(ConfigError, match="use 'fsdp,data'"):
        load_test_config("configs/two_tower.py:tiny", "sharding.rules.batch=data,fsdp")
    with pytest.raises(ConfigError, match="at most one may be -1"):
        load_test_config("configs/two_tower.py:tiny", "mesh.fsdp=-1")


def test_unknown_argument_and_missing_file():
    with pytest.raises(ConfigError, match="unknown config argument 'huge'"):
        load_config(f"{REPO}/configs/two_tower.py:huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.py:tiny")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")
                                        if p.stem not in ("__init__", "common")))
def test_every_config_accepts_tiny(name):
    config = load_test_config(f"configs/{name}.py:tiny")
    assert config.train.steps > 0
    json.dumps(config.to_dict())  # the resolved config is JSON-serialisable (written to config.json)


def test_cli_rejects_typo_before_compiling(tmp_path, capsys):
    from launch.cli import main

    code = main(["train", "--config", f"{REPO}/configs/two_tower.py:tiny", "--workdir", str(tmp_path),
                 "--set", "optimizer.learnig_rate=0.1"])
    assert code == 2
    assert "did you mean 'optimizer.learning_rate'" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("old,new", [("data.data_dir", "data.root"), ("data.eval_batch_size", "eval.batch_size"),
                                     ("data.max_eval_examples", "eval.max_examples"),
                                     ("eval.max_queries", "eval.max_examples"),
                                     ("eval.max_records", "eval.max_examples")])
def test_renamed_keys_are_rejected_naming_the_new_key(old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(old)} was renamed: use {re.escape(new)}$"):
        load_test_config("configs/kuaisearch_recall.py:tiny", f"{old}=1")
    # a config file that still defines the old key is refused too
    group, leaf = old.split(".")
    file = tmp_path / "old_keys.py"
    file.write_text("from configs.common import base_config\n\n\ndef get_config(arg):\n    c = base_config()\n"
                    f"    c.task = 'two_tower'\n    c.{group}.{leaf} = 1\n    return c\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(old)} was renamed: use {re.escape(new)}$"):
        load_config(str(file))
