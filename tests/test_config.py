"""Configuration: defaults, resolution and the exact one-line error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlr import config
from fedlr.cli import main
from fedlr.config import ConfigError


def test_defaults_resolve_every_key() -> None:
    cfg = config.resolve({})
    assert set(cfg) == set(config.SCHEMA)
    assert cfg["model"] == "mlp" and cfg["width"] == 256  # mnist1d defaults
    assert config.resolve({"dataset": "hf:mnist"})["model"] == "cnn"


def test_dumps_round_trips(tmp_path: Path) -> None:
    cfg = config.resolve({"method": "fedprox", "fedprox.mu": 0.1, "simulation.num_gpus": 0.25})
    path = tmp_path / "c.toml"
    path.write_text(config.dumps(cfg))
    assert config.load(path) == cfg


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert config.resolve({"lr": 1})["lr"] == 1.0
    with pytest.raises(ConfigError, match=r"^rounds = 2\.5: must be an integer >= 1$"):
        config.resolve({"rounds": 2.5})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rouds": 3}, "unknown key 'rouds'; did you mean 'rounds'?"),
        ({"rounds": "10"}, "rounds = '10': must be an integer >= 1"),
        ({"rounds": 0}, "rounds = 0: must be an integer >= 1"),
        ({"alpha": 0}, "alpha = 0: must be a number > 0"),
        ({"alpha": -1.5}, "alpha = -1.5: must be a number > 0"),
        ({"method": "fedfoo"}, "method = 'fedfoo': must be one of " + ", ".join(repr(m) for m in config.METHODS)),
        ({"dataset": "cifar"}, "dataset = 'cifar': must be one of 'mnist1d', 'digits' or 'hf:<hub id>'"),
        ({"num_clients": 5, "clients_per_round": 6}, "clients_per_round = 6: must be between 1 and num_clients (5)"),
        ({"partition": "pathological", "classes_per_client": 11},
         "classes_per_client = 11: must be between 1 and 10 (the classes of 'mnist1d')"),
        ({"simulation.num_gpus": 1.5}, "simulation.num_gpus = 1.5: fractions are allowed only below 1 "
                                       "(a whole number of GPUs or a share of one)"),
        ({"model": "cnn"}, "model = 'cnn': 2-D CNNs need images; use 'mlp' or 'cnn1d' for mnist1d"),
        ({"simulation": 3}, "'simulation' is a table, not a value; its keys: simulation.num_cpus, "
                            "simulation.num_gpus, simulation.round_timeout, simulation.clients_per_call"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.resolve(raw)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def _cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *extra: str) -> tuple[int, str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    code = main(["run", str(path), "--out", str(tmp_path / "out"), *extra])
    return code, capsys.readouterr().err


def test_cli_exits_2_with_one_line_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(tmp_path, capsys, "num_clients = 3\nclients_per_round = 4\n")
    assert code == 2
    assert err == "fedlr: error: clients_per_round = 4: must be between 1 and num_clients (3)\n"
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_cli_set_overrides_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(tmp_path, capsys, "", "--set", "alpha=0")
    assert (code, err) == (2, "fedlr: error: alpha = 0: must be a number > 0\n")
    code, err = _cli(tmp_path, capsys, "", "--set", "fedprox.muu=1")
    assert (code, err) == (2, "fedlr: error: unknown key 'fedprox.muu'; did you mean 'fedprox.mu'?\n")


def test_cli_malformed_toml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(tmp_path, capsys, "rounds = = 3\n")
    assert code == 2 and err.startswith(f"fedlr: error: config file '{tmp_path / 'c.toml'}' is not valid TOML: ")
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == f"fedlr: error: config file '{tmp_path / 'nope.toml'}' does not exist\n"


def test_cli_refuses_to_overwrite_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    code, err = _cli(tmp_path, capsys, "")
    assert code == 2
    assert err == (
        f"fedlr: error: --out {tmp_path / 'out'}: already holds results; use --resume {tmp_path / 'out'} "
        "to continue or --force to overwrite\n"
    )


def test_sweep_validates_every_point_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    code = main(["sweep", str(path), "--grid", "alpha=0.5,0", "--out", str(tmp_path / "sw")])
    assert code == 2
    assert capsys.readouterr().err == "fedlr: error: alpha = 0: must be a number > 0\n"
    assert not (tmp_path / "sw").exists()
