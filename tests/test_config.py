import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_expand_output_root_into_every_path():
    config = load_config(None, ["output_root=s3a://bucket/run1"])
    assert config.ingest.output == "s3a://bucket/run1/images"
    assert config.visualize.output == "s3a://bucket/run1/sheets"


@pytest.mark.parametrize("name, key, expected", [
    ("base.yaml", "transfer.model_name", "InceptionV3"),
    ("local.yaml", "transfer.input_size", 75),
    ("test.yaml", "output_root", "out-test"),
    ("cluster.yaml", "ingest.output", "hdfs:///user/spark/spark-image-pipelines/images"),
    ("folder.yaml", "ingest.splits", {"train": 0.8, "validation": 0.1, "test": 0.1}),
])
def test_every_shipped_config_file_loads_its_own_values(name, key, expected):
    value = load_config(ROOT / "conf" / name)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_include_layers_merge_and_overrides_parse_yaml_values(tmp_path):
    (tmp_path / "base.yaml").write_text("ingest:\n  validation_size: 100\n  partitions: 3\n")
    (tmp_path / "env.yaml").write_text("include: base.yaml\ningest:\n  partitions: 5\n")
    config = load_config(tmp_path / "env.yaml", ["visualize.one_hot=true", "mnist.sources=[local]"])
    assert config.ingest.validation_size == 100
    assert config.ingest.partitions == 5
    assert config.visualize.one_hot is True
    assert config.mnist.sources == ["local"]


def test_spark_conf_values_become_strings():
    config = load_config(None, ["spark.conf={spark.sql.shuffle.partitions: 4, a.flag: true}"])
    assert config.spark.conf == {"spark.sql.shuffle.partitions": "4", "a.flag": "true"}


def test_unknown_key_is_named_with_its_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  validaton_size: 10\n")
    with pytest.raises(ConfigError, match=r"ingest\.validaton_size: unknown key. Received"):
        load_config(path)


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["ingest.validation_size=lots"])
    message = str(info.value)
    assert "ingest.validation_size" in message
    assert "'lots'" in message
    assert "integer" in message


def test_out_of_range_and_bad_choice_are_rejected():
    with pytest.raises(ConfigError, match="ingest.validation_size"):
        load_config(None, ["ingest.validation_size=60000"])
    with pytest.raises(ConfigError, match=r"ingest.mode.*Received: ingest.mode='append'"):
        load_config(None, ["ingest.mode=append"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="ingset: unknown key"):
        load_config(None, ["ingset.partitions=2"])


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="--set expects section.key=value. Received: 'novalue'"):
        load_config(None, ["novalue"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping. Received: list"):
        load_config(listy)


def test_config_is_frozen_and_digest_is_stable():
    config = load_config(None)
    with pytest.raises(ValidationError, match="frozen"):
        config.ingest.partitions = 3  # type: ignore[misc]
    assert config.digest("ingest") == load_config(None).digest("ingest")
    assert config.digest("ingest") != load_config(None, ["ingest.partitions=3"]).digest("ingest")
    assert config.digest("ingest") == load_config(None, ["visualize.count=5"]).digest("ingest")


def test_base_yaml_lists_every_key_with_the_code_default():
    """conf/base.yaml says it holds every default: every key is there, with the code's value."""
    import yaml


    base = yaml.safe_load((ROOT / "conf" / "base.yaml").read_text())
    defaults = Config().model_dump(mode="json")
    free_form = {"conf", "architectures", "storage_options"}  # mappings the user fills

    def compare(code: dict, written: dict, where: str) -> list[str]:
        problems = []
        for key, value in code.items():
            if key not in written:
                problems.append(f"{where}{key} is missing")
            elif isinstance(value, dict) and key not in free_form:
                problems += compare(value, written[key], f"{where}{key}.")
        return problems

    assert compare(defaults, base, "") == []
    loaded = load_config(ROOT / "conf" / "base.yaml").model_dump(mode="json")
    output_root = loaded["output_root"]
    expanded = json.loads(json.dumps(defaults).replace("{output_root}", output_root))
    assert {k: v for k, v in loaded.items() if k != "spark"} == {
        k: v for k, v in expanded.items() if k != "spark"}
