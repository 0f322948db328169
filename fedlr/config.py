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
    ``str``; ``low``/``high`` bound a number (``low_open``/``high_open`` make
    the lower/upper bound strict). ``default`` of ``None`` means "resolved from other keys".
    """

    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # A str key may also take values matched by this predicate (e.g. "hf:<id>").
    extra: Callable[[str], bool] | None = None
    extra_help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
            return text + (f" or {self.extra_help}" if self.extra_help else "")
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            return (f"{name} in {'(' if self.low_open else '['}{_fmt(self.low)}, "
                    f"{_fmt(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        return name


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# FedSVD and its two baselines (shared/specs/fedsvd.md §5); fedlr.lowrank.lora.LORA_METHODS.
LORA_METHODS = ("fedsvd", "ffa-lora", "fedavg-lora")
METHODS = ("fedavg", "fedprox", "fedadam", "fedmud", *LORA_METHODS, "fedre", "daringfed")
OFFLINE_DATASETS = ("mnist1d", "digits")
MODELS = ("mlp", "cnn1d", "cnn", "cnn4")
PARTITIONS = ("iid", "dirichlet", "pathological")
# privacy.mechanism values; each one's checks are keyed on its name in resolve().
PRIVACY_MECHANISMS = ("none", "dpsgd", "ldp")
# Methods whose client trainer runs DP-SGD under privacy.mechanism = "dpsgd".
DPSGD_METHODS = ("fedavg", "fedprox", "fedadam", *LORA_METHODS)
# Models with hidden Linear layers for LoRA (the head, their last Linear, stays frozen).
LORA_MODELS = ("mlp", "cnn")
# Layer-wise LDP (FedRE, shared/specs/fedre.md): sensitive-feature mask families by the
# number of spatial input dimensions (§3), and the methods whose client trainer releases
# its upload through fedlr.privacy.ldp under privacy.mechanism = "ldp".
LDP_MASKS = {1: ("w0", "w1", "w2"), 2: ("center", "left", "top")}
LDP_METHODS = ("fedavg", "fedprox", "fedadam", "fedre", "fedmud", *LORA_METHODS)

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
    "data.classes": Field(str, "", "the task: '' = every class; '5-9' or '1,3,7' keeps those classes, "
                                   "relabelled 0, 1, ... in the order given"),
    # --- simulation engine
    "simulation.num_cpus": Field(float, 1.0, "CPUs per client actor", low=0.0, low_open=True),
    "simulation.num_gpus": Field(float, 0.0, "GPUs per client actor (fractional allowed)", low=0.0),
    "simulation.round_timeout": Field(float, 600.0, "seconds to wait for a round's replies", low=0.0, low_open=True),
    "simulation.clients_per_call": Field(int, 0, "most clients one actor call carries (0: no cap, two balanced calls "
                                                 "per actor; 1: one message per call, as Flower)", low=0),
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
    # LoRA fine-tuning: fedsvd, ffa-lora, fedavg-lora (Lee et al., NeurIPS 2025, arXiv 2505.12805;
    # shared/specs/fedsvd.md §2, §4, §6)
    "fedsvd.rank": Field(int, 8, "LoRA rank r of every adapted Linear layer", low=1),
    "fedsvd.alpha": Field(float, None, "LoRA scaling alpha, the adapter output is scaled by alpha/r "
                                       "(default: fedsvd.rank)", low=0.0, low_open=True),
    "fedsvd.svd_period": Field(int, 1, "FedSVD re-factorizes B·A every svd_period rounds", low=1),
    "fedsvd.solver": Field(str, "qr", "FedSVD's SVD: exact QR route or randomized (torch.svd_lowrank)",
                           choices=("qr", "randomized")),
    "fedsvd.max_grad_norm": Field(float, 1.0, "global gradient-norm clip of non-private LoRA training "
                                              "(0: off; DP-SGD clips per example with privacy.clip)", low=0.0),
    "fedsvd.pretrained": Field(str, "", "state dict of the frozen base model; '' = fedlr pretrains it "
                                        "on fedsvd.source_classes and caches it"),
    "fedsvd.source_classes": Field(str, "0-4", "classes of the source task fedlr pretrains on; disjoint "
                                               "from data.classes and as many"),
    "fedsvd.pretrain_epochs": Field(int, 30, "epochs of central pretraining (Adam, lr 1e-3)", low=1),
    # Privacy (composes with every method in DPSGD_METHODS; shared/specs/fedsvd.md §3)
    "privacy.mechanism": Field(str, "none", "what protects the clients' data", choices=PRIVACY_MECHANISMS),
    "privacy.epsilon": Field(float, 6.0, "dpsgd: per-client example-level budget epsilon for the whole run; "
                                         "ldp: the budget of every single upload (per release)",
                             low=0.0, low_open=True),
    "privacy.delta": Field(float, 1e-5, "per-client delta", low=0.0, high=1.0, low_open=True, high_open=True),
    "privacy.clip": Field(float, 2.0, "dpsgd: per-example gradient-norm bound C; ldp: L2 bound C of a "
                                      "client's whole update", low=0.0, low_open=True),
    "privacy.accountant": Field(str, "rdp", "Opacus accountant, used for calibration and tracking alike",
                                choices=("rdp", "prv")),
    # Layer-wise LDP (FedRE, Xiao et al., arXiv 2505.04889; shared/specs/fedre.md §2-§7):
    # privacy.mechanism = "ldp" with privacy.epsilon, .delta, .clip as above.
    "privacy.allocation": Field(str, "sensitivity", "ldp: split of a release's budget over layers, equal or "
                                                    "less to layers with more sensitive information",
                                choices=("uniform", "sensitivity")),
    "privacy.ldp_noise": Field(str, "gaussian", "ldp: analytic Gaussian (epsilon, delta) or Laplace (pure epsilon)",
                               choices=("gaussian", "laplace")),
    "privacy.beta": Field(float, 4.0, "ldp: sharpness of the sensitivity allocation exp(-beta*PSI)", low=0.0),
    "privacy.tiers": Field(str, "1", "ldp: budget multipliers dealt to the clients, e.g. '1,0.25' makes half "
                                     "of them 4x stricter"),
    "privacy.masks": Field(str, None, "ldp: sensitive-feature mask families dealt to the clients (default: all "
                                      "of the dataset's: 'w0,w1,w2' for 1-D inputs, 'center,left,top' for images)"),
    "privacy.epsilon_total": Field(float, 0.0, "ldp: cap on a client's cumulative epsilon; it stops "
                                               "participating before exceeding it (0: no cap)", low=0.0),
    "privacy.tau2": Field(str, "estimate", "fedre: between-client variance tau^2 of the aggregation weights, "
                                           "estimated or zero (pure inverse-variance)", choices=("estimate", "zero")),
    "privacy.attack": Field(bool, False, "ldp: at the end, invert single-sample releases of the first layer "
                                         "and report attack_similarity in summary.json"),
    "privacy.attack_probes": Field(int, 100, "ldp: public samples the attack inverts per mask family", low=1),
    # DaringFed pricing (Xin et al., IJCAI 2025, arXiv 2505.05842; shared/specs/daringfed.md §2, §5, §8):
    # method = "daringfed", one arriving client per round. Choices mirror fedlr.pricing.SCHEMES / TII_DESIGNS
    # (kept literal so that reading a config does not import SciPy; tests check they agree).
    "pricing.scheme": Field(str, "persuasion", "daringfed: signaling and pricing design of every arrival "
                                               "(full-information: oracle benchmark)",
                            choices=("persuasion", "full-information", "no-signal", "full-disclosure", "fixed-price")),
    "pricing.tii_design": Field(str, "ce", "daringfed persuasion under two-sided incomplete information: "
                                           "inflated-cost ('ce', fast) or type-belief ('distributional', slow)",
                                choices=("ce", "distributional")),
    "pricing.tii": Field(bool, True, "daringfed persuasion: false = OII oracle ablation (the server is told the "
                                     "client's true CPU frequency)"),
    "pricing.mu": Field(float, 0.5, "daringfed: true probability of the high-bandwidth state tau_hi",
                        low=0.0, high=1.0),
    "pricing.value_factor": Field(float, 1.5, "daringfed: server value V = value_factor x median prior-expected "
                                              "client cost", low=0.0, low_open=True),
    "pricing.psi_share": Field(float, 0.2, "daringfed: bandwidth price, psi*tau_hi as a share of the value",
                               low=0.0, high=1.0, high_open=True),
    "pricing.budget_factor": Field(float, 0.5, "daringfed: budget B = budget_factor x rounds x median "
                                               "prior-expected cost", low=0.0, low_open=True),
    "pricing.gamma_cap": Field(float, 0.0, "daringfed: cap on any single price, on top of B_left/(T-t+1) "
                                           "(0: none)", low=0.0),
    "pricing.eps_loc": Field(float, 0.1, "daringfed: local-model error in V = value(1 - eps_loc) - psi*tau "
                                         "(not a privacy budget)", low=0.0, high=1.0, high_open=True),
    "pricing.time_noise": Field(float, 0.05, "daringfed: relative sd of a client's measured computation time",
                                low=0.0),
    "pricing.arrival_rate": Field(float, 1.0, "daringfed: Poisson arrival rate (1/s) of the simulated clock",
                                  low=0.0, low_open=True),
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
    if field.high is not None and (value >= field.high if field.high_open else value > field.high):
        raise bad
    return value


def parse_classes(text: str) -> tuple[int, ...]:
    """Class ids of a class list such as ``data.classes``, in the order given.

    ``""`` gives ``()`` (no selection); ``"5-9"``, ``"1,3,7"`` and ``"0-2,7"``
    give ranges and single ids. Raises ``ValueError`` (a bare reason) on
    anything else or on a repeated class.
    """
    if not text.strip():
        return ()
    classes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        low, sep, high = part.partition("-")
        if not (low.isascii() and low.isdigit() and (not sep or (high.isascii() and high.isdigit()))):
            raise ValueError("must be '' or class ids and ranges such as '5-9' or '1,3,7'")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"range '{part}' is empty")
        classes.extend(range(first, last + 1))
    if len(set(classes)) != len(classes):
        raise ValueError("names a class twice")
    return tuple(classes)


def _classes(cfg: Config, key: str) -> tuple[int, ...]:
    try:
        return parse_classes(cfg[key])
    except ValueError as err:
        raise ConfigError(f"{key} = {cfg[key]!r}: {err}") from None


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
    _resolve_pricing(cfg)  # before the generic clients_per_round check: daringfed's message is more precise
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
    _resolve_task_lora_privacy(cfg)
    _resolve_ldp(cfg)
    return dict(sorted(cfg.items()))


def _resolve_task_lora_privacy(cfg: Config) -> None:
    """Checks and defaults of ``data.classes``, ``fedsvd.*`` and ``privacy.*``, in place."""
    dataset, method = cfg["dataset"], cfg["method"]
    num_classes = NUM_CLASSES_OFFLINE.get(dataset)
    target = _classes(cfg, "data.classes")
    for key, classes in (("data.classes", target), ("fedsvd.source_classes", _classes(cfg, "fedsvd.source_classes"))):
        if num_classes and classes and max(classes) >= num_classes:
            raise ConfigError(f"{key} = {cfg[key]!r}: {dataset!r} has classes 0-{num_classes - 1}")
    if target and cfg["partition"] == "pathological" and cfg["classes_per_client"] > len(target):
        raise ConfigError(
            f"classes_per_client = {cfg['classes_per_client']}: must be between 1 and {len(target)} "
            f"(the classes of data.classes = {cfg['data.classes']!r})"
        )
    if cfg["fedsvd.alpha"] is None:
        cfg["fedsvd.alpha"] = float(cfg["fedsvd.rank"])  # α = r (spec §4)
    if cfg["fedsvd.pretrained"]:
        # Absolute, because `flwr run` runs the app from another working directory.
        cfg["fedsvd.pretrained"] = str(Path(cfg["fedsvd.pretrained"]).expanduser().resolve())
    if method in LORA_METHODS:
        if cfg["model"] not in LORA_MODELS:
            raise ConfigError(
                f"model = {cfg['model']!r}: LoRA (method = {method!r}) adapts hidden Linear layers under a frozen "
                f"head; use one of {', '.join(repr(m) for m in LORA_MODELS)}"
            )
        if not cfg["fedsvd.pretrained"]:
            _check_task_shift(cfg, target)
    if cfg["privacy.mechanism"] == "dpsgd":
        if cfg["norm"] == "batch":
            raise ConfigError(
                "norm = 'batch': BatchNorm mixes the examples of a batch, which DP-SGD (privacy.mechanism = "
                "'dpsgd') cannot allow; use 'group' or 'none'"
            )
        if method not in DPSGD_METHODS:
            raise ConfigError(
                f"privacy.mechanism = 'dpsgd': not available for method = {method!r}; "
                f"methods with DP-SGD clients: {', '.join(DPSGD_METHODS)}"
            )


def _check_task_shift(cfg: Config, target: tuple[int, ...]) -> None:
    """fedlr pretrains W₀ on the source classes' training examples, so they must
    not be the clients' (private) examples, and the frozen head needs one output
    per target class (shared/specs/fedsvd.md §6; README "FedSVD and DP-SGD")."""
    source = _classes(cfg, "fedsvd.source_classes")
    if not source:
        raise ConfigError("fedsvd.source_classes = '': must name the source task's classes, e.g. '0-4' "
                          "(or give a model in fedsvd.pretrained)")
    if not target or set(source) & set(target):
        shared = "every class" if not target else f"classes {sorted(set(source) & set(target))}"
        raise ConfigError(
            f"data.classes = {cfg['data.classes']!r}: shares {shared} with fedsvd.source_classes = "
            f"{cfg['fedsvd.source_classes']!r}, whose training examples fedlr pretrains on; the clients' task must "
            "use other classes, e.g. data.classes = '5-9' with source '0-4'"
        )
    if len(source) != len(target):
        raise ConfigError(
            f"data.classes = {cfg['data.classes']!r}: has {len(target)} classes but fedsvd.source_classes = "
            f"{cfg['fedsvd.source_classes']!r} has {len(source)}; the frozen head needs as many"
        )


def parse_tiers(text: str) -> tuple[float, ...]:
    """Budget multipliers of ``privacy.tiers`` such as ``"1,0.25"`` (shared/specs/fedre.md §3).

    Raises ``ValueError`` (a bare reason) on anything but positive finite numbers.
    """
    try:
        tiers = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError("must be positive numbers separated by commas, e.g. '1' or '1,0.25'") from None
    if not all(math.isfinite(m) and m > 0 for m in tiers):
        raise ValueError("every multiplier must be a positive finite number, e.g. '1' or '1,0.25'")
    return tiers


def _resolve_ldp(cfg: Config) -> None:
    """Checks and defaults of layer-wise LDP (``privacy.*`` under ``"ldp"``, method ``fedre``), in place."""
    method, mechanism = cfg["method"], cfg["privacy.mechanism"]
    # Hub datasets are image classification; MNIST-1D is the one 1-D set.
    families = LDP_MASKS[1 if cfg["dataset"] == "mnist1d" else 2]
    if cfg["privacy.masks"] is None:
        cfg["privacy.masks"] = ",".join(families)
    masks = [m.strip() for m in cfg["privacy.masks"].split(",")]
    if not all(m in families for m in masks) or len(set(masks)) != len(masks):
        raise ConfigError(
            f"privacy.masks = {cfg['privacy.masks']!r}: must be distinct mask families of {cfg['dataset']!r} "
            f"separated by commas, from {', '.join(repr(m) for m in families)}"
        )
    cfg["privacy.masks"] = ",".join(masks)
    try:
        parse_tiers(cfg["privacy.tiers"])
    except ValueError as err:
        raise ConfigError(f"privacy.tiers = {cfg['privacy.tiers']!r}: {err}") from None
    if method == "fedre" and mechanism != "ldp":
        raise ConfigError(
            f"method = 'fedre': needs privacy.mechanism = 'ldp' (it weights clients by their LDP noise), "
            f"got {mechanism!r}"
        )
    if mechanism == "ldp":
        if method not in LDP_METHODS:
            raise ConfigError(
                f"privacy.mechanism = 'ldp': not available for method = {method!r}; "
                f"methods with LDP clients: {', '.join(LDP_METHODS)}"
            )
        if cfg["norm"] == "batch":
            raise ConfigError(
                "norm = 'batch': BatchNorm's running statistics would be uploaded without noise under "
                "privacy.mechanism = 'ldp'; use 'group' or 'none'"
            )
    if cfg["privacy.attack"]:
        if mechanism != "ldp":
            raise ConfigError(
                f"privacy.attack = true: attacks LDP releases; needs privacy.mechanism = 'ldp', got {mechanism!r}"
            )
        if cfg["model"] != "mlp" or method in LORA_METHODS:
            raise ConfigError(
                f"privacy.attack = true: inverts the dense update of a Linear first layer with bias; needs model "
                f"'mlp' and a dense method, got model = {cfg['model']!r}, method = {method!r}"
            )


def _resolve_pricing(cfg: Config) -> None:
    """Checks of DaringFed (``method = "daringfed"``, ``pricing.*``; shared/specs/daringfed.md §3, §8)."""
    if cfg["method"] == "daringfed" and cfg["clients_per_round"] != 1:
        raise ConfigError(
            f"clients_per_round = {cfg['clients_per_round']}: method = 'daringfed' serves one arriving client per "
            "round (rounds = arrivals); set clients_per_round = 1"
        )
    if not cfg["pricing.tii"] and cfg["pricing.scheme"] != "persuasion":
        raise ConfigError(
            f"pricing.tii = false: the OII oracle ablation of pricing.scheme = 'persuasion' only, "
            f"got pricing.scheme = {cfg['pricing.scheme']!r}"
        )


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
