import re
from pathlib import Path

import pytest

from raycell.config import ConfigError, ExperimentConfig, defaults_yaml, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["train.epochs=3", "train.lr=1e-4", "split.unseen=[b1, b2]", "scaling.use_gpu=true"]
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.split.unseen == ["b1", "b2"] and cfg.scaling.use_gpu is True
    assert cfg.model.type == "conventional"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "epochs" in msg and "lr" in msg


def test_unknown_section_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="true/false"):
        load_config(None, ["scaling.use_gpu=maybe"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  bogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "train.bogus" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="split.fractions"):
        load_config(None, ["split.fractions=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        load_config(None, ["data.batch_size=64", "data.shuffle_buffer=10"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.parquet_reader=v3", "data.parquet_reader must be v1 or v2, got 'v3'"),
        ("export.format=xlsx", "export.format must be h5ad, parquet or csv, got 'xlsx'"),
        ("infer.z_mode=3", "infer.z_mode must be predicted, balanced, uniform or zero, got 3"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.layer_decay=1.5", "train.layer_decay must be between 0 and 1, got 1.5"),
        ("synth.n_cells=0", "synth.n_cells must be >= 1, got 0"),
        ("data.heads=[time, time]", "data.heads has a column twice: ['time', 'time']"),
    ],
)
def test_choices_and_bounds_declared_with_the_key_are_one_line(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert str(exc.value) == f"--set {override}: {message}"


def test_validate_checks_keys_set_in_code():
    """A key changed in Python after loading is held to the same declaration by `validate()`."""
    cfg = load_config(None)
    cfg.data.normalize = "per-image"
    with pytest.raises(
        ConfigError, match=r"^data.normalize must be global or crop, got 'per-image'$"
    ):
        cfg.validate()
    cfg = load_config(None)
    cfg.infer.num_actors = 0
    with pytest.raises(ConfigError, match=r"^infer.num_actors must be >= 1, got 0$"):
        cfg.validate()


def test_every_default_is_valid_and_normalize_defaults_once():
    from raycell.constants import DEFAULT_NORMALIZE
    from raycell.formats.spec import DataSpec

    ExperimentConfig().validate()
    spec = DataSpec(("a",), (1, 8, 8), "uint8")
    assert ExperimentConfig().data.normalize == DEFAULT_NORMALIZE == spec.normalize


def test_round_trip():
    cfg = load_config(None, ["train.epochs=7", "model.args={latent_dim: 12}"])
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.model.args == {"latent_dim": 12}


def test_base_yaml_is_current_and_every_config_loads():
    """configs/base.yaml is the generated defaults; every shipped config must load."""
    assert (ROOT / "configs" / "base.yaml").read_text() == defaults_yaml(), (
        "regenerate with: raycell config --defaults > configs/base.yaml"
    )
    for f in sorted((ROOT / "configs").rglob("*.yaml")):
        load_config(f)


def test_help_says_what_a_key_does_not_what_it_measured():
    """Help lands in configs/base.yaml and `raycell config --defaults`: benchmark results (speed
    ratios, timings on this or that machine, throughputs) belong in bench/README.md and docs/."""
    import dataclasses

    measured = re.compile(
        r"\d(\.\d+)?x (faster|slower)|\d (img|images|rows|cells)/s|\bon \d+ cores\b"
        r"|\d(\.\d+)? s (to|for) "
    )
    cfg = ExperimentConfig()
    found = [
        f"{section.name}.{f.name}: {m.group(0)!r}"
        for section in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, section.name))
        for f in dataclasses.fields(getattr(cfg, section.name))
        if (m := measured.search(f.metadata.get("help", "")))
    ]
    assert not found, found


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "line " in msg


@pytest.mark.parametrize(
    "verb", ["synth", "ingest", "split", "train", "infer", "infer-z", "evaluate", "demo"]
)
def test_each_shortcut_flag_sets_a_config_key_its_help_names(verb, capsys):
    from raycell.cli import build_parser, config_overrides

    flags = build_parser().parse_args([verb]).flag_keys
    with pytest.raises(SystemExit):
        build_parser().parse_args([verb, "--help"])
    entries = re.split(r"\n(?=  -)", capsys.readouterr().out)  # one entry per option in --help
    for dest, (key, flag) in flags.items():
        ExperimentConfig().get(key)  # a real key (AttributeError otherwise)
        entry = next(e for e in entries if re.match(rf"  {flag}\b", e))
        assert key in entry, (flag, entry)
    # the override a flag produces is what the key would get from --set, and it names the flag
    args = build_parser().parse_args(["train", "--epochs", "3", "--gpu", "--set", "train.lr=0.1"])
    assert config_overrides(args) == [
        ("train.lr=0.1", "--set train.lr=0.1"),
        ("train.epochs=3", "--epochs 3"),
        ("scaling.use_gpu=true", "--gpu"),
    ]
    cfg = load_config(None, [ov for ov, _ in config_overrides(args)])
    assert cfg.train.epochs == 3 and cfg.scaling.use_gpu is True and cfg.train.lr == 0.1


def test_override_errors_name_their_source():
    with pytest.raises(ConfigError, match=r"^--epochs 0: train.epochs must be >= 1, got 0$"):
        load_config(None, ["train.lr=0.1", "train.epochs=0"], ["--set train.lr=0.1", "--epochs 0"])
    with pytest.raises(ConfigError, match=r"^--set train.epochs=0: "):
        load_config(None, ["train.epochs=0"])


@pytest.mark.parametrize("key", ["data.path", "train.runs_dir", "infer.out", "tune.out"])
def test_uri_paths_are_refused_with_what_to_do(key):
    from raycell.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=f"{key}: 's3://bucket/x' is a URI.*mount the bucket"
    ) as exc:
        load_config(None, [f"{key}=s3://bucket/x"])
    assert "\n" not in str(exc.value)
