"""Typed experiment configuration: schema, defaults, validation and resolution.

A configuration is a TOML file with top-level keys and tables (``[simulation]``,
``[fedprox]``, ...). Inside fedlr it is a flat ``dict`` keyed by dotted names
(``"simulation.num_cpus"``), the same shape Flower's ``run_config`` uses. Every
key is declared once in :data:`SCHEMA`; anything else is rejected.

Invalid input raises :class:`ConfigError` whose message is one line naming the
key, the value given and what is allowed (``shared/CONTRACT.md``: exit code 2).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

Config = dict[str, Any]


class ConfigError(ValueError):
    """An invalid configuration or command line; the message is one line."""


@dataclass(frozen=True)
class Field:
    """One configuration key.

    ``kind`` is ``int``, ``float``, ``str`` or ``bool``. ``choices`` restricts a
    ``str``; ``low``/``high`` bound a number (``low_open`` makes the lower
    bound strict). ``default`` of ``None`` means "resolved from other keys".
    """

    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    # A str key may also take values matched by this predicate (e.g. "hf:<id>").
    extra: Callable[[str], bool] | None = None
    extra_help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
            return text + (f" or {self.extra_help}" if self.extra_help else "")
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        return name


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


METHODS = ("fedavg", "fedprox", "fedadam", "fedmud")
OFFLINE_DATASETS = ("mnist1d", "digits")
MODELS = ("mlp", "cnn1d", "cnn", "cnn4")
PARTITIONS = ("iid", "dirichlet", "pathological")

SCHEMA: dict[str, Field] = {
    # --- the experiment
    "method": Field(str, "fedavg", "server strategy", choices=METHODS),
    "dataset": Field(
        str, "mnist1d", "dataset", choices=OFFLINE_DATASETS,
        extra=lambda v: v.startswith("hf:") and len(v) > 3, extra_help="'hf:<hub id>'",
    ),
    "model": Field(str, None, "network (default: mlp for mnist1d/digits, cnn for images)", choices=MODELS),
    "width": Field(int, None, "hidden width of the MLP (default: 256 on mnist1d, 128 otherwise)", low=1),
    "norm": Field(str, "none", "normalisation layers in CNNs ('batch' is not DP-compatible)",
                  choices=("none", "group", "batch")),
    "seed": Field(int, 0, "every random choice derives from it", low=0),
    "rounds": Field(int, 30, "federated rounds", low=1),
    "num_clients": Field(int, 100, "simulated clients (SuperNodes)", low=1),
    "clients_per_round": Field(int, 10, "clients sampled each round", low=1),
    "partition": Field(str, "dirichlet", "how the training set is split", choices=PARTITIONS),
    "alpha": Field(float, 0.5, "Dirichlet concentration", low=0.0, low_open=True),
    "classes_per_client": Field(int, 2, "classes per client for 'pathological'", low=1),
    "local_epochs": Field(int, 1, "local epochs per round", low=1),
    "batch_size": Field(int, 32, "local mini-batch size", low=1),
    "lr": Field(float, 0.05, "client learning rate (SGD)", low=0.0, low_open=True),
    "momentum": Field(float, 0.0, "client SGD momentum (a new optimizer every round)", low=0.0, high=1.0),
    "weight_decay": Field(float, 0.0, "client SGD weight decay", low=0.0),
    "max_failures": Field(int, 0, "failed clients tolerated per round (more fails the run)", low=0),
    # --- data
    "data.num_samples": Field(int, 12000, "MNIST-1D samples generated (80% train, 20% test)", low=100),
    "data.test_fraction": Field(float, 0.2, "held-out fraction for digits and hub sets without a test split",
                                low=0.0, high=0.9, low_open=True),
    "data.min_partition_size": Field(int, 1, "Dirichlet re-draws until every client has this many samples", low=0),
    # --- simulation engine
    "simulation.num_cpus": Field(float, 1.0, "CPUs per client actor", low=0.0, low_open=True),
    "simulation.num_gpus": Field(float, 0.0, "GPUs per client actor (fractional allowed)", low=0.0),
    "simulation.round_timeout": Field(float, 600.0, "seconds to wait for a round's replies", low=0.0, low_open=True),
    # --- fault injection (to test failure handling; off by default)
    "faults.client": Field(int, -1, "partition id that fails on purpose (-1: none)", low=-1),
    "faults.round": Field(int, 1, "round in which it fails", low=1),
    "faults.kind": Field(str, "raise", "how it fails: raise an exception or hang", choices=("raise", "hang")),
    # --- strategy parameters
    "fedprox.mu": Field(float, 0.01, "FedProx proximal coefficient", low=0.0),
    "fedadam.eta": Field(float, 0.01, "FedAdam server learning rate", low=0.0, low_open=True),
    "fedadam.beta_1": Field(float, 0.9, "FedAdam first-moment decay", low=0.0, high=1.0),
    "fedadam.beta_2": Field(float, 0.99, "FedAdam second-moment decay", low=0.0, high=1.0),
    "fedadam.tau": Field(float, 1e-3, "FedAdam adaptivity", low=0.0, low_open=True),
    # FedMUD (Li et al., ICML 2025, arXiv 2505.23176; shared/specs/fedmud.md §2, §4)
    "fedmud.decomposition": Field(str, "bkd", "FedMUD factorization: low-rank matrices or block-wise Kronecker",
                                  choices=("lowrank", "bkd")),
    "fedmud.aggregation": Field(str, "aad", "FedMUD factor averaging: naive or aggregation-aware (exact)",
                                choices=("naive", "aad")),
    "fedmud.ratio": Field(float, 0.03125, "FedMUD upload budget: trainable entries over the dense model's",
                          low=0.0, high=1.0, low_open=True),
    "fedmud.init_scale": Field(float, 5.0, "FedMUD seed-drawn factors are U(-a, a) with a = init_scale",
                               low=0.0, low_open=True),
    "fedmud.target": Field(str, "update", "what is factorized: the round's update (MUD) or the weight (FedLMT)",
                           choices=("update", "weight")),
    "fedmud.skip": Field(str, "0-0", "'F-L': the first F and last L Linear/Conv layers stay dense"),
}

# Resolved defaults that depend on other keys.
DATASET_DEFAULT_MODEL = {"mnist1d": "mlp", "digits": "mlp"}
NUM_CLASSES_OFFLINE = {"mnist1d": 10, "digits": 10}


def _flatten(tree: dict[str, Any], prefix: str = "") -> Config:
    flat: Config = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: Config) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *tables, leaf = name.split(".")
        for table in tables:
            node = node.setdefault(table, {})
        node[leaf] = value
    return tree


def _check_known(key: str) -> Field:
    field = SCHEMA.get(key)
    table_keys = [k for k in SCHEMA if k.startswith(key + ".")]
    if field is None and table_keys:
        raise ConfigError(f"'{key}' is a table, not a value; its keys: {', '.join(table_keys)}")
    if field is None:
        close = difflib.get_close_matches(key, SCHEMA, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(sorted(SCHEMA))}"
        raise ConfigError(f"unknown key '{key}'{hint}")
    return field


def _coerce(key: str, value: Any, field: Field) -> Any:
    """Check ``value``'s type and range against ``field``; ints widen to float."""
    bad = ConfigError(f"{key} = {value!r}: must be {field.allowed()}")
    if field.kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if field.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif field.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif field.kind is str:
        if not isinstance(value, str):
            raise bad
        if field.choices is not None and value not in field.choices and not (field.extra and field.extra(value)):
            raise bad
    if field.low is not None and (value <= field.low if field.low_open else value < field.low):
        raise bad
    if field.high is not None and value > field.high:
        raise bad
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set KEY=VALUE``; VALUE is read as a TOML value, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set rounds=5")
    key, raw = (part.strip() for part in text.split("=", 1))
    _check_known(key)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as fedavg or hf:mnist
    return key, value


def load_toml(path: str | Path) -> Config:
    """Read a TOML file into a flat dict, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with path.open("rb") as fh:
            tree = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror}") from None
    return _flatten(tree)


def resolve(raw: Config, overrides: Iterable[tuple[str, Any]] = ()) -> Config:
    """Validate ``raw`` (flat) plus overrides and return the full resolved config.

    Every key of :data:`SCHEMA` is present in the result; values that depend on
    other keys (model, width) are filled in. Raises :class:`ConfigError`.
    """
    given = dict(raw)
    given.update(overrides)
    cfg: Config = {}
    for key, value in given.items():
        cfg[key] = _coerce(key, value, _check_known(key))
    for key, field in SCHEMA.items():
        cfg.setdefault(key, field.default)

    dataset = cfg["dataset"]
    if cfg["model"] is None:
        cfg["model"] = DATASET_DEFAULT_MODEL.get(dataset, "cnn")
    if cfg["width"] is None:
        cfg["width"] = 256 if dataset == "mnist1d" else 128
    if cfg["clients_per_round"] > cfg["num_clients"]:
        raise ConfigError(
            f"clients_per_round = {cfg['clients_per_round']}: must be between 1 and num_clients "
            f"({cfg['num_clients']})"
        )
    if cfg["model"] == "cnn1d" and dataset != "mnist1d":
        raise ConfigError(f"model = 'cnn1d': only for dataset 'mnist1d'; use 'mlp', 'cnn' or 'cnn4' for {dataset!r}")
    if cfg["model"] in ("cnn", "cnn4") and dataset == "mnist1d":
        raise ConfigError("model = " + repr(cfg["model"]) + ": 2-D CNNs need images; use 'mlp' or 'cnn1d' for mnist1d")
    num_classes = NUM_CLASSES_OFFLINE.get(dataset)
    if cfg["partition"] == "pathological" and num_classes and cfg["classes_per_client"] > num_classes:
        raise ConfigError(
            f"classes_per_client = {cfg['classes_per_client']}: must be between 1 and {num_classes} "
            f"(the classes of {dataset!r})"
        )
    train_size = {"mnist1d": int(cfg["data.num_samples"] * 0.8), "digits": int(1797 * (1 - cfg["data.test_fraction"]))}
    if dataset in train_size and train_size[dataset] < cfg["num_clients"]:
        raise ConfigError(
            f"num_clients = {cfg['num_clients']}: must be at most the {train_size[dataset]} training samples "
            f"of {dataset!r}"
        )
    if cfg["simulation.num_gpus"] > 1 and not float(cfg["simulation.num_gpus"]).is_integer():
        raise ConfigError(
            f"simulation.num_gpus = {cfg['simulation.num_gpus']}: fractions are allowed only below 1 "
            "(a whole number of GPUs or a share of one)"
        )
    # FedMUD: the skip syntax, and the one pattern defined for weight factorization (spec §2.4).
    skip = cfg["fedmud.skip"].split("-")
    if len(skip) != 2 or not all(part.isascii() and part.isdigit() for part in skip):
        raise ConfigError(
            f"fedmud.skip = {cfg['fedmud.skip']!r}: must be 'F-L' with integers F, L >= 0 "
            "(the first F and last L Linear/Conv layers stay dense), for example '0-0' or '1-1'"
        )
    if cfg["method"] == "fedmud" and cfg["fedmud.target"] == "weight" and (
        cfg["fedmud.decomposition"], cfg["fedmud.aggregation"]
    ) != ("lowrank", "naive"):
        raise ConfigError(
            f"fedmud.target = 'weight': needs fedmud.decomposition = 'lowrank' and fedmud.aggregation = 'naive' "
            f"(the FedLMT baseline), got {cfg['fedmud.decomposition']!r} and {cfg['fedmud.aggregation']!r}"
        )
    return dict(sorted(cfg.items()))


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load, override (``KEY=VALUE`` strings) and resolve a config file."""
    return resolve(load_toml(path), [parse_override(text) for text in overrides])


def dumps(cfg: Config) -> str:
    """The resolved config as TOML text (top-level keys first, then tables)."""
    return tomli_w.dumps(_unflatten({k: v for k, v in cfg.items() if v is not None}))


def describe() -> str:
    """A Markdown table of every key (used by ``fedlr keys`` and the README)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, field in SCHEMA.items():
        default = "(auto)" if field.default is None else repr(field.default)
        rows.append(f"| `{key}` | `{default}` | {field.allowed()} | {field.help} |")
    return "\n".join(rows)
