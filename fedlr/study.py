"""Privacy / communication trade-off studies: ``fedlr study STUDY.toml``.

A study is the product of four named axes — datasets × splits × codecs ×
privacy — repeated over seeds, on top of one ``[base]`` configuration. Each
axis entry is a named set of configuration overrides::

    title = "digits: dense vs FedMUD vs FedSVD under DP-SGD and LDP"
    seeds = [0, 1]
    accuracy_target = 0.8           # for "bytes to reach the target" against epsilon
    skip_invalid = false            # true: skip combinations the validator rejects
    exclude = [{codec = "fedmud*", privacy = "dpsgd*"}]

    [base]                          # any fedlr config keys (flat dotted keys or tables)
    rounds = 8
    num_clients = 10

    [datasets]
    digits = {dataset = "digits", model = "mlp", width = 64}
    [splits]
    iid = {partition = "iid"}
    dir0.5 = ...                    # (quote names with dots: "dir0.5" = {...})
    [codecs]
    dense = {method = "fedavg"}
    fedmud-16 = {method = "fedmud", "fedmud.ratio" = 0.0625}
    [privacy]
    none = {}
    dpsgd-eps8 = {"privacy.mechanism" = "dpsgd", "privacy.epsilon" = 8}

Overrides apply in the order base, ``--set``, dataset, split, codec, privacy,
then the seed: a later one wins. Every combination is validated (and
preflighted: data, FedMUD's ratio, FedSVD's pretrained model) before any run
starts. A combination the validator rejects stops the study with exit 2 naming
it, unless an ``exclude`` rule removes it or ``skip_invalid = true``; skipped
combinations are listed in ``report.md`` and ``skipped.csv``.

Every run is a separate ``fedlr run`` process writing ``OUT/runs/<name>/``;
``--jobs`` of them run at once, each with its share of the CPUs. A run whose
``status.json`` says completed with the same resolved config is not run again,
so an interrupted study resumes where it stopped. The outputs — ``runs.csv``,
``study.csv`` (mean and sample standard deviation over seeds), three Pareto
plots and ``report.md`` — are all computed from the same aggregated rows.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlr import config as config_mod
from fedlr.config import Config, ConfigError
from fedlr.results import read_metrics, write_atomic

# The axes in the order their overrides apply and run names are built.
AXES = ("dataset", "split", "codec", "privacy")
# The study file's table for each axis.
AXIS_TABLES = {"dataset": "datasets", "split": "splits", "codec": "codecs", "privacy": "privacy"}
STUDY_KEYS = ("title", "seeds", "accuracy_target", "skip_invalid", "exclude", "base", *AXIS_TABLES.values())
# Entry names become directory names joined by "_", so "_" and "/" are not allowed in them.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")

RUN_FIELDS = (
    "run", *AXES, "seed", "method", "mechanism", "status", "cached", "final_accuracy", "best_accuracy",
    "total_bytes_up", "total_bytes_down", "total_bytes", "bytes_per_round", "epsilon", "wall_s",
    "bytes_to_target", "process_s", "error",
)
# Per-run quantities averaged over seeds in study.csv (each gets _mean and _std).
AGGREGATED = ("final_accuracy", "best_accuracy", "total_bytes", "bytes_per_round", "epsilon", "wall_s",
              "bytes_to_target")
CONFIG_FIELDS = (
    *AXES, "method", "mechanism", "n_seeds", "n_failed", "status",
    *(f"{k}_{s}" for k in AGGREGATED for s in ("mean", "std")),
    "n_reached_target", "pareto_bytes", "pareto_epsilon",
)


class StudyError(ConfigError):
    """An invalid study file or command line (exit 2, one line)."""


# ------------------------------------------------------------------ the study file
@dataclass(frozen=True)
class Study:
    """A parsed, key-checked study file (combinations are checked by :func:`expand`)."""

    path: Path
    title: str
    base: Config
    axes: dict[str, dict[str, Config]]  # axis -> entry name -> flat overrides, in file order
    seeds: tuple[int, ...]
    accuracy_target: float
    exclude: tuple[dict[str, Any], ...] = ()
    skip_invalid: bool = False


@dataclass(frozen=True)
class Point:
    """One run: an entry of every axis, a seed and the resolved config."""

    labels: tuple[tuple[str, str], ...]  # (axis, entry name) in AXES order
    seed: int
    cfg: Config

    @property
    def config_name(self) -> str:
        """The configuration's name (everything but the seed)."""
        return "_".join(name for _, name in self.labels)

    @property
    def name(self) -> str:
        """The run's directory name under ``OUT/runs/``."""
        return f"{self.config_name}_s{self.seed}"


@dataclass(frozen=True)
class Skipped:
    """A combination that is not run, and why."""

    labels: tuple[tuple[str, str], ...]
    kind: str  # "excluded" or "invalid"
    reason: str

    @property
    def config_name(self) -> str:
        return "_".join(name for _, name in self.labels)


def _where(path: Path, location: str, message: str) -> StudyError:
    return StudyError(f"{path}: {location}: {message}")


def _check_overrides(path: Path, location: str, flat: Config) -> Config:
    """Key and value checks of one table of overrides (the combination is checked later)."""
    for key, value in flat.items():
        if key == "seed":
            raise _where(path, location, "seed: set by the study's seeds list, not by overrides")
        try:
            config_mod._coerce(key, value, config_mod._check_known(key))
        except ConfigError as err:
            raise _where(path, location, str(err)) from None
    return flat


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> Study:
    """Read and check a study file; ``overrides`` (``KEY=VALUE``) apply on top of ``[base]``.

    Raises :class:`StudyError` with a one-line message naming the file, the
    table and the key at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file '{path}' does not exist")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"study file '{path}' is not valid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StudyError(f"study file '{path}' cannot be read: {err}") from None
    for key in tree:
        if key not in STUDY_KEYS:
            import difflib

            close = difflib.get_close_matches(key, STUDY_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(STUDY_KEYS)}"
            raise StudyError(f"{path}: unknown key '{key}'{hint}")

    base_tree = tree.get("base", {})
    if not isinstance(base_tree, dict):
        raise _where(path, "base", "must be a table of config keys")
    base = _check_overrides(path, "[base]", config_mod._flatten(base_tree))
    for text in overrides:
        key, value = config_mod.parse_override(text)
        base.update(_check_overrides(path, f"--set {text}", {key: value}))

    axes: dict[str, dict[str, Config]] = {}
    for axis, table in AXIS_TABLES.items():
        entries = tree.get(table)
        if not isinstance(entries, dict) or not entries:
            raise _where(path, f"[{table}]", f"missing or empty; give at least one named {axis}, "
                                             f"e.g. {table}.NAME = {{...}} (an empty table {{}} keeps [base])")
        axes[axis] = {}
        for name, value in entries.items():
            if not _NAME.match(name):
                raise _where(path, f"{table}.{name!r}", "entry names must be letters, digits, '.', '+' and '-' "
                                                       "(they become directory names)")
            if not isinstance(value, dict):
                raise _where(path, f"{table}.{name}", f"must be a table of config overrides, got {value!r}")
            axes[axis][name] = _check_overrides(path, f"{table}.{name}", config_mod._flatten(value))

    seeds = tree.get("seeds")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _where(path, "seeds", f"must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    target = tree.get("accuracy_target")
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
        raise _where(path, "accuracy_target", f"must be a number in (0, 1], got {target!r}")
    title = tree.get("title", path.stem)
    if not isinstance(title, str):
        raise _where(path, "title", f"must be a string, got {title!r}")
    skip_invalid = tree.get("skip_invalid", False)
    if not isinstance(skip_invalid, bool):
        raise _where(path, "skip_invalid", f"must be true or false, got {skip_invalid!r}")
    exclude = tree.get("exclude", [])
    if not isinstance(exclude, list):
        raise _where(path, "exclude", "must be a list of tables such as [{codec = 'fedmud*', privacy = 'dpsgd*'}]")
    rules = tuple(_check_rule(path, i, rule, axes) for i, rule in enumerate(exclude))
    return Study(path, title, base, axes, tuple(seeds), float(target), rules, skip_invalid)


def _check_rule(path: Path, index: int, rule: Any, axes: dict[str, dict[str, Config]]) -> dict[str, Any]:
    """An exclude rule: axis names match entry names (glob), other keys match config values."""
    where = f"exclude[{index}]"
    if not isinstance(rule, dict) or not rule:
        raise _where(path, where, f"must be a non-empty table such as {{codec = 'fedmud*'}}, got {rule!r}")
    flat = config_mod._flatten(rule)
    for key, value in flat.items():
        if key in AXES:
            if not isinstance(value, str):
                raise _where(path, where, f"{key} = {value!r}: must be an entry name or glob pattern (a string)")
            if not any(fnmatch.fnmatchcase(name, value) for name in axes[key]):
                raise _where(path, where, f"{key} = {value!r}: matches no entry of [{AXIS_TABLES[key]}] "
                                          f"({', '.join(axes[key])})")
        else:
            try:
                field_ = config_mod._check_known(key)
            except ConfigError as err:
                raise _where(path, where, f"{err}; or an axis: {', '.join(AXES)}") from None
            if not (field_.kind is str and isinstance(value, str)):  # strings may be glob patterns
                try:
                    config_mod._coerce(key, value, field_)
                except ConfigError as err:
                    raise _where(path, where, str(err)) from None
    return flat


def _rule_matches(rule: dict[str, Any], labels: dict[str, str], raw: Config) -> bool:
    for key, want in rule.items():
        have = labels[key] if key in AXES else raw.get(key)
        if isinstance(want, str) and isinstance(have, str):
            if not fnmatch.fnmatchcase(have, want):
                return False
        elif have != want:
            return False
    return True


def expand(study: Study) -> tuple[list[Point], list[Skipped]]:
    """Every run of the study, and the combinations left out (excluded or invalid).

    Points come in the order datasets × splits × codecs × privacy × seeds, the
    order of ``runs.csv``. Raises :class:`StudyError` on the first invalid
    combination unless ``skip_invalid`` is set.
    """
    import itertools

    points: list[Point] = []
    skipped: list[Skipped] = []
    defaults = {k: f.default for k, f in config_mod.SCHEMA.items()}
    for names in itertools.product(*(study.axes[a] for a in AXES)):
        labels = tuple(zip(AXES, names, strict=True))
        raw = dict(study.base)
        for axis, name in labels:
            raw.update(study.axes[axis][name])
        matching = [i for i, rule in enumerate(study.exclude) if _rule_matches(rule, dict(labels), {**defaults, **raw})]
        if matching:
            skipped.append(Skipped(labels, "excluded", f"exclude[{matching[0]}]"))
            continue
        try:
            cfgs = [config_mod.resolve(raw, [("seed", s)]) for s in study.seeds]
        except ConfigError as err:
            bad = Skipped(labels, "invalid", str(err))
            if not study.skip_invalid:
                raise invalid_error(study, bad) from None
            skipped.append(bad)
            continue
        points.extend(Point(labels, s, cfg) for s, cfg in zip(study.seeds, cfgs, strict=True))
    if not points:
        raise StudyError(f"{study.path}: no runs left after excluding {len(skipped)} combinations")
    return points, skipped


def invalid_error(study: Study, bad: Skipped) -> StudyError:
    """The exit-2 message for an invalid combination the study did not exclude."""
    combo = " ".join(f"{a}={n}" for a, n in bad.labels)
    return StudyError(f"{study.path}: {combo} is invalid: {bad.reason}; exclude it with an exclude rule "
                      "or set skip_invalid = true")


def preflight(study: Study, points: list[Point]) -> tuple[list[Point], list[Skipped]]:
    """The method checks ``fedlr run`` makes before Ray starts, for every point, here.

    It loads (and caches) every dataset partition and builds FedSVD's pretrained
    model once, in this process, so that parallel runs neither race to build
    the same cache file nor discover an unreachable FedMUD ratio after others
    have run. A combination failing for any seed is invalid as a whole.
    """
    from fedlr.data import DatasetUnavailable, load_federated_data
    from strategies import preflight as method_preflight

    bad: dict[str, Skipped] = {}
    for p in points:
        if p.config_name in bad:
            continue
        try:
            method_preflight(p.cfg, load_federated_data(p.cfg))
        except (ConfigError, DatasetUnavailable) as err:
            bad[p.config_name] = Skipped(p.labels, "invalid", str(err))
            if not study.skip_invalid:
                raise invalid_error(study, bad[p.config_name]) from None
    kept = [p for p in points if p.config_name not in bad]
    if not kept:
        raise StudyError(f"{study.path}: no runs left: every combination is invalid")
    return kept, list(bad.values())


# ------------------------------------------------------------------ per-run numbers
def bytes_to_target(metrics: Sequence[dict[str, Any]], target: float) -> int | None:
    """Cumulative bytes (up + down, through that round) at the first round whose
    ``test_accuracy`` reaches ``target``; ``None`` if no round does.

    Round 0 (the initial model, no traffic) counts: a model that starts above
    the target needs 0 bytes.
    """
    total = 0
    for row in metrics:
        total += row["bytes_up"] + row["bytes_down"]
        if row["test_accuracy"] >= target:
            return total
    return None


def run_row(point: Point, run_dir: Path, *, target: float, cached: bool, process_s: float | None) -> dict[str, Any]:
    """One ``runs.csv`` row from a finished (completed or failed) run directory."""
    row: dict[str, Any] = {k: None for k in RUN_FIELDS}
    row.update(run=point.name, **dict(point.labels), seed=point.seed, method=point.cfg["method"],
               mechanism=point.cfg["privacy.mechanism"], cached="yes" if cached else "no", process_s=process_s)
    status = _read_json(run_dir / "status.json")
    summary = _read_json(run_dir / "summary.json")
    if status.get("status") != "completed" or not summary:
        row["status"] = "failed"
        error = status.get("error") or _last_line(run_dir / "log.txt") or "the run ended without completing"
        row["error"] = " ".join(str(error).split())[:500]  # one CSV line
        return row
    up, down = summary["total_bytes_up"], summary["total_bytes_down"]
    row.update(
        status="completed", final_accuracy=summary["final_accuracy"], best_accuracy=summary["best_accuracy"],
        total_bytes_up=up, total_bytes_down=down, total_bytes=up + down,
        bytes_per_round=(up + down) / max(summary["rounds"], 1), epsilon=summary.get("epsilon"),
        wall_s=summary["wall_s"], bytes_to_target=bytes_to_target(read_metrics(run_dir), target),
    )
    return row


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ aggregation
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the non-missing values.

    One value has std 0 (there is no spread to estimate); none gives ``(None, None)``.
    """
    xs = [float(v) for v in values if v is not None and v != ""]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which ``(accuracy, cost)`` points are Pareto-optimal (maximize accuracy, minimize cost).

    A point is optimal when no other point has accuracy ≥ and cost ≤ with at
    least one strict. A missing accuracy is never optimal; a missing cost is
    +∞ (e.g. no privacy: ε = ∞). Identical points are optimal together.
    """
    clean = [(a, math.inf if c is None else c) for a, c in points]
    flags = []
    for i, (a, c) in enumerate(clean):
        if a is None:
            flags.append(False)
            continue
        dominated = any(
            b is not None and b >= a and d <= c and (b > a or d < c)
            for j, (b, d) in enumerate(clean) if j != i
        )
        flags.append(not dominated)
    return flags


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``study.csv``: one row per configuration (all but the seed), in first-seen order.

    Means and standard deviations are over the completed seeds; ``epsilon`` and
    ``bytes_to_target`` over the seeds that have one. ``pareto_bytes`` and
    ``pareto_epsilon`` mark the Pareto-optimal configurations within each
    dataset × split on (final accuracy, total bytes) and (final accuracy, ε; no
    privacy is ε = ∞).
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[a] for a in AXES), []).append(r)
    out: list[dict[str, Any]] = []
    for key, runs in groups.items():
        done = [r for r in runs if r["status"] == "completed"]
        row: dict[str, Any] = dict(zip(AXES, key, strict=True))
        row.update(method=runs[0]["method"], mechanism=runs[0]["mechanism"], n_seeds=len(done),
                   n_failed=len(runs) - len(done))
        row["status"] = "completed" if len(done) == len(runs) else "failed" if not done else "partial"
        for k in AGGREGATED:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std(r[k] for r in done)
        row["n_reached_target"] = sum(r["bytes_to_target"] is not None for r in done)
        out.append(row)
    for group in _by_dataset_split(out).values():
        for cost, flag in (("total_bytes_mean", "pareto_bytes"), ("epsilon_mean", "pareto_epsilon")):
            front = pareto_front([(r["final_accuracy_mean"], r[cost]) for r in group])
            for r, on in zip(group, front, strict=True):
                r[flag] = on
    return out


def _by_dataset_split(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["split"]), []).append(r)
    return groups


def reaches_target(row: dict[str, Any]) -> bool:
    """A configuration reaches the accuracy target when every completed seed does."""
    return row["n_seeds"] > 0 and row["n_reached_target"] == row["n_seeds"]


# ------------------------------------------------------------------ formatting
def fmt_acc(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f} ± {std:.4f}"


def fmt_mb(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean / 1e6:.3f} ± {std / 1e6:.3f}"


def fmt_kb(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean / 1e3:.1f} ± {std / 1e3:.1f}"


def fmt_eps(mean: float | None, std: float | None) -> str:
    return "∞" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def study_table(rows: Sequence[dict[str, Any]], target: float) -> str:
    """The Markdown table of ``study.csv`` used in ``report.md`` and printed at the end."""
    lines = [
        "| dataset | split | codec | privacy | seeds | final acc | best acc | total MB | kB/round | ε "
        f"| MB to acc {target:g} | wall s | Pareto bytes | Pareto ε |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for r in rows:
        if r["n_seeds"] == 0:
            to_target = "–"
        elif reaches_target(r):
            to_target = fmt_mb(r["bytes_to_target_mean"], r["bytes_to_target_std"])
        else:
            to_target = f"not reached ({r['n_reached_target']}/{r['n_seeds']})"
        seeds = f"{r['n_seeds']}" + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")
        eps = "–" if r["n_seeds"] == 0 else fmt_eps(r["epsilon_mean"], r["epsilon_std"])
        wall = "–" if r["wall_s_mean"] is None else f"{r['wall_s_mean']:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['split']} | {r['codec']} | {r['privacy']} | {seeds} "
            f"| {fmt_acc(r['final_accuracy_mean'], r['final_accuracy_std'])} "
            f"| {fmt_acc(r['best_accuracy_mean'], r['best_accuracy_std'])} "
            f"| {fmt_mb(r['total_bytes_mean'], r['total_bytes_std'])} "
            f"| {fmt_kb(r['bytes_per_round_mean'], r['bytes_per_round_std'])} | {eps} | {to_target} | {wall} "
            f"| {'**yes**' if r.get('pareto_bytes') else ''} | {'**yes**' if r.get('pareto_epsilon') else ''} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """``rows`` as CSV with exactly ``fields`` (missing values empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
    write_atomic(path, buf.getvalue())


def _overrides_text(flat: Config) -> str:
    return ", ".join(f"`{k} = {v!r}`" for k, v in flat.items()) or "(the base)"


def write_report(
    path: Path, study: Study, config_rows: Sequence[dict[str, Any]], run_rows: Sequence[dict[str, Any]],
    skipped: Sequence[Skipped], *, command: str,
) -> None:
    """``report.md``: the settings, the study table and the Pareto-optimal configurations."""
    target = study.accuracy_target
    n_failed = sum(r["status"] == "failed" for r in run_rows)
    n_cached = sum(r["cached"] == "yes" for r in run_rows)
    lines = [
        f"# Trade-off study: {study.title}",
        "",
        f"`{command}`",
        "",
        "## Settings",
        "",
        f"- study file: `{study.path}`; seeds {list(study.seeds)}; accuracy target {target:g}",
        f"- runs: {len(run_rows)} ({len(config_rows)} configurations × seeds): "
        f"{len(run_rows) - n_cached} trained, {n_cached} cached, {n_failed} failed",
        f"- base: {_overrides_text(study.base)}",
    ]
    for axis in AXES:
        lines.append(f"- {AXIS_TABLES[axis]}:")
        lines.extend(f"  - **{name}**: {_overrides_text(flat)}" for name, flat in study.axes[axis].items())
    lines += [
        "",
        "Accuracy is the final test accuracy (mean ± sample std over seeds). Bytes are the measured payload, "
        "up + down, over the whole run. ε is the largest cumulative ε of any client at the end (DP-SGD: "
        "example-level, for the whole run; LDP: per-release budgets added up over the client's releases); "
        "∞ without privacy. \"MB to acc\" is the cumulative traffic at the first round reaching the target.",
        "",
        "## Results",
        "",
        study_table(config_rows, target),
        "",
        "## Pareto-optimal configurations",
        "",
        "Within each dataset and split: no other configuration has at least the accuracy and at most the "
        "cost, with one of the two strictly better.",
    ]
    for (dataset, split), group in _by_dataset_split(config_rows).items():
        lines += ["", f"### {dataset} / {split}", ""]
        for flag, label, cost in (("pareto_bytes", "accuracy vs total bytes", "bytes"),
                                  ("pareto_epsilon", "accuracy vs ε", "eps")):
            best = sorted((r for r in group if r.get(flag)), key=lambda r: -r["final_accuracy_mean"])
            items = [
                f"{r['codec']} + {r['privacy']} (acc {r['final_accuracy_mean']:.4f}, "
                + (f"{r['total_bytes_mean'] / 1e6:.3f} MB)" if cost == "bytes"
                   else f"ε {'∞' if r['epsilon_mean'] is None else format(r['epsilon_mean'], '.2f')})")
                for r in best
            ]
            lines.append(f"- {label}: " + ("; ".join(items) if items else "none (no completed configuration)"))
        missing = [f"{r['codec']} + {r['privacy']}" for r in group if r["n_seeds"] and not reaches_target(r)]
        if missing:
            lines.append(f"- not reaching accuracy {target:g} in every seed (left out of `bytes_vs_epsilon.png`): "
                         + ", ".join(missing))
    if skipped:
        lines += ["", "## Skipped combinations", ""]
        for s in skipped:
            why = f"excluded by {s.reason}" if s.kind == "excluded" else f"invalid: {s.reason}"
            lines.append(f"- {' '.join(f'{a}={n}' for a, n in s.labels)}: {why}")
    failed = [r for r in run_rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines.extend(f"- `{r['run']}`: {r['error']}" for r in failed)
    lines += [
        "", "## Plots", "",
        "- `plots/accuracy_vs_bytes.png`: final accuracy against total bytes",
        "- `plots/accuracy_vs_epsilon.png`: final accuracy against ε (lines: no privacy)",
        f"- `plots/bytes_vs_epsilon.png`: bytes to reach accuracy {target:g} against ε",
        "",
        "Error bars are one standard deviation over seeds; circled points are Pareto-optimal.",
        "",
    ]
    write_atomic(path, "\n".join(lines))


# ------------------------------------------------------------------ plots
_MARKERS = {"none": "o", "dpsgd": "s", "ldp": "^"}


def plot_study(config_rows: Sequence[dict[str, Any]], plots: Path, target: float) -> None:
    """The three Pareto plots, one panel per dataset × split."""
    from fedlr.results import _pyplot

    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    plots.mkdir(parents=True, exist_ok=True)
    groups = _by_dataset_split(config_rows)
    datasets = list(dict.fromkeys(d for d, _ in groups))
    splits = list(dict.fromkeys(s for _, s in groups))
    codecs = list(dict.fromkeys(r["codec"] for r in config_rows))
    colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(codecs)}
    mechanisms = list(dict.fromkeys(r["mechanism"] for r in config_rows))

    def panels(title: str):
        fig, axes = plt.subplots(len(datasets), len(splits), figsize=(5.2 * len(splits), 4.0 * len(datasets)),
                                 squeeze=False)
        fig.suptitle(title)
        return fig, axes

    def finish(fig, name: str) -> None:
        handles = [Line2D([], [], color=colour[c], marker="o", linestyle="", label=c) for c in codecs]
        handles += [Line2D([], [], color="grey", marker=_MARKERS.get(m, "D"), linestyle="", label=f"privacy: {m}")
                    for m in mechanisms]
        handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=11,
                              linestyle="--", label="Pareto front"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 5), 1, 0.96))
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)

    def scatter(ax, rows, x_key, y_key, pareto_key: str | None) -> None:
        for r in rows:
            ax.errorbar(r[f"{x_key}_mean"], r[f"{y_key}_mean"], xerr=r[f"{x_key}_std"], yerr=r[f"{y_key}_std"],
                        fmt=_MARKERS.get(r["mechanism"], "D"), color=colour[r["codec"]], capsize=2, markersize=5)
            ax.annotate(r["privacy"], (r[f"{x_key}_mean"], r[f"{y_key}_mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in rows if pareto_key and r.get(pareto_key)), key=lambda r: r[f"{x_key}_mean"])
        if front:
            xs, ys = [r[f"{x_key}_mean"] for r in front], [r[f"{y_key}_mean"] for r in front]
            ax.plot(xs, ys, "k--", linewidth=0.8, drawstyle="steps-post")
            ax.scatter(xs, ys, s=120, facecolors="none", edgecolors="black", linewidths=1.0)

    def log_x(ax, xs: list[float]) -> None:
        # A log axis around one ε value zooms to its float rounding; show a decade either side.
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if xs and max(xs) / min(xs) < 10:
            ax.set_xlim(min(xs) / 3, max(xs) * 3)

    def no_privacy_lines(ax, rows, y_key: str, pareto_key: str | None) -> None:
        # No privacy is ε = ∞: a horizontal line at the configuration's value, not a point.
        for r in rows:
            on = bool(pareto_key and r.get(pareto_key))
            ax.axhline(r[f"{y_key}_mean"], color=colour[r["codec"]], linestyle="-" if on else ":",
                       linewidth=1.6 if on else 1.0)
            ax.annotate(f"{r['codec']}, ε = ∞" + (" (Pareto)" if on else ""), (1.0, r[f"{y_key}_mean"]),
                        xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=6,
                        color=colour[r["codec"]])

    # accuracy against total bytes
    fig, axes = panels("final accuracy against total bytes (up + down)")
    for (d, s), rows in groups.items():
        ax = axes[datasets.index(d)][splits.index(s)]
        scatter(ax, [r for r in rows if r["n_seeds"]], "total_bytes", "final_accuracy", "pareto_bytes")
        ax.set(xscale="log", xlabel="total bytes", ylabel="final test accuracy", title=f"{d} / {s}")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short log axis
        ax.grid(alpha=0.3)
    finish(fig, "accuracy_vs_bytes.png")

    # accuracy against epsilon
    fig, axes = panels("final accuracy against ε (lines: no privacy)")
    for (d, s), rows in groups.items():
        ax = axes[datasets.index(d)][splits.index(s)]
        done = [r for r in rows if r["n_seeds"]]
        private = [r for r in done if r["epsilon_mean"] is not None]
        scatter(ax, private, "epsilon", "final_accuracy", "pareto_epsilon")
        no_privacy_lines(ax, [r for r in done if r["epsilon_mean"] is None], "final_accuracy", "pareto_epsilon")
        ax.set(xlabel="ε (largest cumulative, any client)", ylabel="final test accuracy", title=f"{d} / {s}")
        if private:
            log_x(ax, [r["epsilon_mean"] for r in private])
        ax.grid(alpha=0.3)
    finish(fig, "accuracy_vs_epsilon.png")

    # bytes to reach the accuracy target against epsilon
    fig, axes = panels(f"bytes to first reach accuracy {target:g} against ε (lines: no privacy)")
    for (d, s), rows in groups.items():
        ax = axes[datasets.index(d)][splits.index(s)]
        reached = [r for r in rows if reaches_target(r)]
        scatter(ax, [r for r in reached if r["epsilon_mean"] is not None], "epsilon", "bytes_to_target", None)
        no_privacy_lines(ax, [r for r in reached if r["epsilon_mean"] is None], "bytes_to_target", None)
        missing = sum(1 for r in rows if r["n_seeds"] and not reaches_target(r))
        if missing:
            ax.text(0.01, 0.01, f"{missing} configuration(s) never reach {target:g} (omitted; see report.md)",
                    transform=ax.transAxes, fontsize=6, va="bottom")
        if not reached:
            ax.text(0.5, 0.5, "no configuration reaches the target", transform=ax.transAxes, ha="center")
        ax.set(yscale="log", xlabel="ε (largest cumulative, any client)", ylabel="bytes to target",
               title=f"{d} / {s}")
        if any(r["epsilon_mean"] is not None for r in reached):
            log_x(ax, [r["epsilon_mean"] for r in reached if r["epsilon_mean"] is not None])
        ax.grid(alpha=0.3)
    finish(fig, "bytes_vs_epsilon.png")


# ------------------------------------------------------------------ running
def default_jobs() -> int:
    """Half the cores: each run also has a server process and Ray's own daemons."""
    return max(1, (os.cpu_count() or 1) // 2)


def run_env(cfg: Config, jobs: int) -> dict[str, str]:
    """The environment of one run process, with its share of the machine.

    Every run starts its own Ray, which would otherwise claim every core, and
    ``jobs`` of them would oversubscribe the machine ``jobs`` times. Ray's
    ``RAY_OVERRIDE_RESOURCES`` caps the CPUs its scheduler hands out, so at most
    share / ``simulation.num_cpus`` clients train at once; ``OMP_NUM_THREADS``
    caps the server process's torch threads. The config is left alone, so the
    cache still matches when ``--jobs`` changes (results do not depend on it).
    """
    share = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ)
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": max(share, math.ceil(cfg["simulation.num_cpus"]))})
    env["OMP_NUM_THREADS"] = str(share)
    return env


def cached(run_dir: Path, cfg: Config) -> bool:
    """A completed run with exactly this resolved config (``fedlr sweep``'s cache rule)."""
    from fedlr.cli import _completed_summary

    return _completed_summary(run_dir, cfg) is not None


def _resumable(run_dir: Path, cfg: Config) -> bool:
    # Interrupted (status still "running") with a checkpoint and the same config:
    # `fedlr run --resume` continues from the last round instead of starting over.
    try:
        return (_read_json(run_dir / "status.json").get("status") == "running"
                and (run_dir / "checkpoint.pt").is_file() and config_mod.load(run_dir / "config.toml") == cfg)
    except ConfigError:
        return False


Launcher = Callable[[Point, Path, dict[str, str]], None]


def launch_run(point: Point, run_dir: Path, env: dict[str, str]) -> None:
    """Run one point as ``python -m fedlr.cli run`` in a fresh process (its own Ray)."""
    if _resumable(run_dir, point.cfg):
        cmd = ["run", "--resume", str(run_dir)]
    else:
        # Remove a stale verdict before writing the new config: if this process
        # died in between, the old "completed" must not vouch for the new config.
        for name in ("status.json", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        write_atomic(run_dir / "config.toml", config_mod.dumps(point.cfg))
        cmd = ["run", str(run_dir / "config.toml"), "--out", str(run_dir), "--force"]
    # Each run's Ray gets its own temp root (session files, sockets, runtime-env
    # state): Ray instances started at the same moment under the shared
    # /tmp/ray left clients that never replied (seen with --jobs 4).
    ray_tmp = tempfile.mkdtemp(prefix="fedlr-ray-")
    try:
        with (run_dir / "log.txt").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fedlr.cli", *cmd, "--quiet"], stdout=log,
                                    stderr=subprocess.STDOUT, env={**env, "RAY_TMPDIR": ray_tmp})
            _RUNNING.add(proc)
            try:
                proc.wait()
            finally:
                _RUNNING.discard(proc)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# Child processes still running, so that an interrupted study can stop them.
_RUNNING: set[subprocess.Popen] = set()


def _stop_children() -> None:
    for proc in list(_RUNNING):
        proc.terminate()
    for proc in list(_RUNNING):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Progress:
    """The live line per finished run (stderr)."""

    total: int
    quiet: bool = False
    done: int = 0
    lines: list[str] = field(default_factory=list)

    def report(self, row: dict[str, Any]) -> None:
        self.done += 1
        if row["status"] == "completed":
            eps = "–" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
            text = (f"acc={row['final_accuracy']:.4f} bytes={_fmt_bytes(row['total_bytes'])} eps={eps}"
                    + ("  (cached)" if row["cached"] == "yes" else f"  ({row['process_s']:.0f} s)"))
        else:
            text = f"FAILED: {row['error']}"
        line = f"[{self.done}/{self.total}] {row['run']}  {text}"
        self.lines.append(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def execute(points: Sequence[Point], out: Path, *, jobs: int, target: float, progress: Progress,
            launcher: Launcher = launch_run) -> list[dict[str, Any]]:
    """Run every point not already cached, ``jobs`` at a time; rows in ``points`` order.

    Cached runs are reported first. The others start seed by seed (all
    configurations of the first seed, then the next), so an interrupted study
    already has every configuration once. ``runs.csv`` is rewritten after
    every run, so it holds the finished runs of an interrupted study.
    """
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Point] = []
    for p in points:
        run_dir = out / "runs" / p.name
        if cached(run_dir, p.cfg):
            rows[p.name] = run_row(p, run_dir, target=target, cached=True, process_s=None)
            progress.report(rows[p.name])
        else:
            todo.append(p)
    todo.sort(key=lambda p: p.seed)  # stable: expansion order within a seed

    def one(p: Point) -> dict[str, Any]:
        run_dir = out / "runs" / p.name
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            launcher(p, run_dir, run_env(p.cfg, jobs))
        except OSError as err:  # could not start the process: this run failed, the study goes on
            row = run_row(p, run_dir, target=target, cached=False, process_s=None)
            return {**row, "status": "failed", "error": f"could not start the run: {err}"}
        return run_row(p, run_dir, target=target, cached=False, process_s=round(time.perf_counter() - t0, 1))

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fedlr-study")
    try:
        pending: dict[Future, Point] = {pool.submit(one, p): p for p in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                p = pending.pop(fut)
                rows[p.name] = fut.result()
                progress.report(rows[p.name])
                write_csv(out / "runs.csv", [rows[q.name] for q in points if q.name in rows], RUN_FIELDS)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        raise
    pool.shutdown()
    return [rows[p.name] for p in points]


def write_outputs(out: Path, study: Study, run_rows: list[dict[str, Any]], skipped: Sequence[Skipped],
                  command: str) -> list[dict[str, Any]]:
    """``runs.csv``, ``study.csv``, ``skipped.csv``, the plots and ``report.md``; returns study.csv's rows."""
    write_csv(out / "runs.csv", run_rows, RUN_FIELDS)
    config_rows = aggregate(run_rows)
    write_csv(out / "study.csv", config_rows, CONFIG_FIELDS)
    write_csv(out / "skipped.csv",
              [{**dict(s.labels), "kind": s.kind, "reason": s.reason} for s in skipped], (*AXES, "kind", "reason"))
    plot_study(config_rows, out / "plots", study.accuracy_target)
    write_report(out / "report.md", study, config_rows, run_rows, skipped, command=command)
    return config_rows


def run_study(
    path: str | Path, *, out: Path | None = None, jobs: int | None = None, overrides: Sequence[str] = (),
    quiet: bool = False, launcher: Launcher = launch_run,
) -> int:
    """``fedlr study``: validate everything, run what is not cached, write the outputs.

    Returns the exit code: 0, or 1 when a run failed (after writing every
    output). Raises :class:`StudyError` (exit 2) before anything runs.
    """
    study = load_study(path, overrides)
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise StudyError(f"--jobs {jobs}: must be an integer >= 1")
    points, skipped = expand(study)
    points, invalid = preflight(study, points)
    skipped = [*skipped, *invalid]
    out = Path(out) if out else Path("results") / f"study-{study.path.stem}"
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudyError(f"--out {out}: cannot create ({err.strerror})") from None
    command = " ".join(["fedlr study", str(study.path), *(f"--set {o}" for o in overrides)])

    n_configs = len({p.config_name for p in points})
    if not quiet:
        print(f"study {study.path}: {len(points)} runs ({n_configs} configurations × {len(study.seeds)} seeds), "
              f"{len(skipped)} combinations skipped; {jobs} at a time", file=sys.stderr, flush=True)
    progress = Progress(len(points), quiet=quiet)
    t0 = time.perf_counter()
    rows = execute(points, out, jobs=jobs, target=study.accuracy_target, progress=progress, launcher=launcher)
    config_rows = write_outputs(out, study, rows, skipped, command)
    failed = [r for r in rows if r["status"] == "failed"]
    trained = sum(r["cached"] == "no" for r in rows)
    if not quiet:
        print(study_table(config_rows, study.accuracy_target))
    print(f"study: {out.resolve()}  (report.md, study.csv, runs.csv, plots/; {trained} trained, "
          f"{len(rows) - trained} cached, {time.perf_counter() - t0:.0f} s)")
    if failed:
        print(f"fedlr: {len(failed)} of {len(rows)} runs failed (status in runs.csv, errors in report.md):\n"
              + "\n".join(f"  {r['run']}: {r['error']}" for r in failed), file=sys.stderr)
        return 1
    return 0
