"""params.yaml and --set overrides: validated by one set of models, errors name key, value, fix."""

from pathlib import Path

import pytest
import yaml

from g2d.config import load_params, to_dict
from g2d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["params.yaml", "params.tiny.yaml", "params.paper.yaml"])
def test_committed_params_are_valid_and_complete(name):
    raw = yaml.safe_load((ROOT / name).read_text())
    params = load_params(ROOT / name)
    assert to_dict(params) == raw  # every parameter is spelled out in the file, none defaulted


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, {"synth": {"imge_size": 64}}))
    msg = str(e.value)
    assert "unknown key 'synth.imge_size'" in msg
    assert "did you mean 'image_size'" in msg
    assert str(tmp_path / "params.yaml") in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'.*allowed here: seed, paths, tracking, preflight, "
                                          r"synth"):
        load_params(write(tmp_path, {"trainer": {}}))


def test_wrong_type_names_key_value_and_expected(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, {"synth": {"image_size": "big"}}))
    assert "synth.image_size = 'big' is invalid" in str(e.value)
    assert "valid integer" in str(e.value)


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"synth.image_size = 16 is invalid: .*greater than or equal to 32"):
        load_params(write(tmp_path, {"synth": {"image_size": 16}}))
    with pytest.raises(ConfigError, match=r"synth.splits.fractions .* every fraction must be in \(0, 1\], got 1.5"):
        load_params(write(tmp_path, {"synth": {"splits": {"fractions": [0.1, 1.5]}}}))
    with pytest.raises(ConfigError, match=r"synth.pneumothorax.positive_fraction = 1.0 is invalid: .*less than 1"):
        load_params(write(tmp_path, {"synth": {"pneumothorax": {"count": 10, "positive_fraction": 1.0}}}))


def test_set_overrides_are_parsed_and_validated(tmp_path):
    path = write(tmp_path, {})
    params = load_params(path, ["synth.image_size=64", "synth.max_reports=null", "tracking.uri=http://x:5000"])
    assert params.synth.image_size == 64 and params.synth.max_reports is None
    assert params.tracking.uri == "http://x:5000"
    with pytest.raises(ConfigError, match=r"with --set overrides: synth.image_size = 'abc' is invalid"):
        load_params(path, ["synth.image_size=abc"])
    with pytest.raises(ConfigError, match=r"unknown key 'synth.colour'"):
        load_params(path, ["synth.colour=1"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_params(path, ["synth.image_size"])
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        load_params(write(tmp_path, {"seed": 3}), ["seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line"):
        load_params(bad)


def test_set_none_is_the_word_and_null_is_null():
    p = load_params(ROOT / "params.yaml", ["pretrain.dense=none", "pretrain.max_steps=null"])
    assert p.pretrain.dense == "none" and p.pretrain.max_steps is None
