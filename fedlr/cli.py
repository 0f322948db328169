"""The ``fedlr`` command line (``shared/CONTRACT.md``).

Exit codes: 0 success; 2 invalid configuration or usage (one line on stderr,
nothing started); 1 the run failed (the message names the failing client).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedlr import config as config_mod
from fedlr.config import Config, ConfigError
from fedlr.results import write_atomic

EXIT_FAILED, EXIT_USAGE = 1, 2


class UsageError(ConfigError):
    """Bad command-line usage (exit 2)."""


# ----------------------------------------------------------------- helpers
def _default_out(cfg: Config) -> Path:
    return Path("results") / f"{cfg['method']}-{cfg['dataset'].replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_out(out: Path, *, force: bool) -> None:
    """Create ``out`` or refuse to overwrite a run in it (exit 2 before starting)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: already holds results; use --resume {out} to continue or --force to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedlr-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror})") from None
    if force:
        for name in ("metrics.jsonl", "summary.json", "status.json", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "client_state", ignore_errors=True)


def _resume_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> Config:
    saved = run_dir / "config.toml"
    if not saved.is_file():
        raise UsageError(f"--resume {run_dir}: no config.toml there; not a fedlr run directory")
    cfg = config_mod.load(saved)
    if config_path or overrides:
        given = config_mod.load(config_path, overrides) if config_path else config_mod.resolve(
            config_mod.load_toml(saved), [config_mod.parse_override(o) for o in overrides]
        )
        diff = sorted(k for k in cfg if cfg[k] != given.get(k))
        if diff:
            k = diff[0]
            raise UsageError(
                f"--resume {run_dir}: the run used {k} = {cfg[k]!r} but the given config has {given.get(k)!r}; "
                "resume with the run's own config (omit CONFIG and --set)"
            )
    return cfg


def _print_summary(out: Path, summary: dict[str, Any]) -> None:
    print(
        f"done: final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}), "
        f"{summary['total_bytes_up'] / 1e6:.2f} MB up, {summary['total_bytes_down'] / 1e6:.2f} MB down, "
        f"{summary['wall_s']:.1f} s"
    )
    print(f"results: {out.resolve()}  (config.toml, metrics.jsonl, summary.json, plots/)")


# ----------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        cfg = _resume_config(out, args.config, args.set)
        status = out / "status.json"
        if status.is_file() and json.loads(status.read_text()).get("status") == "completed":
            print(f"{out}: already completed; nothing to resume")
            return 0
    else:
        if not args.config:
            raise UsageError("fedlr run: give CONFIG.toml or --resume DIR")
        cfg = config_mod.load(args.config, args.set)
        out = Path(args.out) if args.out else _default_out(cfg)
        prepare_out(out, force=args.force)
    from fedlr.runner import run_experiment

    summary = run_experiment(cfg, out, resume=bool(args.resume), quiet=args.quiet, verbose=args.verbose)
    _print_summary(out, summary)
    return 0


def _grid_values(spec: str) -> tuple[str, list[Any]]:
    if "=" not in spec:
        raise UsageError(f"--grid {spec!r}: expected KEY=V1,V2,...")
    key, raw = spec.split("=", 1)
    values = [config_mod.parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
    if not values:
        raise UsageError(f"--grid {spec!r}: no values")
    return key.strip(), values


def _run_name(point: dict[str, Any]) -> str:
    text = "_".join(f"{k}={v}" for k, v in point.items()) or "run"
    return "".join(c if c.isalnum() or c in "=._-" else "-" for c in text)


SWEEP_FIELDS = (
    "final_accuracy", "best_accuracy", "total_bytes_up", "total_bytes_down",
    "bytes_up_per_round", "bytes_down_per_round", "epsilon", "attack_similarity", "server_utility",
    "participation_rate", "wall_s", "status",
)


def cmd_sweep(args: argparse.Namespace) -> int:
    grids = [_grid_values(g) for g in args.grid]
    keys = [k for k, _ in grids]
    base = config_mod.load_toml(args.config)
    fixed = [config_mod.parse_override(o) for o in args.set]
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grids))]
    # Validate every point before anything runs: a typo in the last value must not
    # surface after an hour of sweeping.
    configs = [config_mod.resolve(base, [*fixed, *p.items()]) for p in points]
    out = Path(args.out) if args.out else Path("results") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create ({err.strerror})") from None

    from fedlr.results import plot_curves, plot_tradeoff, read_metrics
    from fedlr.runner import RunFailed, run_experiment

    rows, failures = [], []
    for i, (point, cfg) in enumerate(zip(points, configs, strict=True), 1):
        run_dir = out / _run_name(point)
        print(f"[{i}/{len(points)}] {run_dir.name}", file=sys.stderr, flush=True)
        summary = _completed_summary(run_dir, cfg)
        if summary is None:
            if run_dir.exists():
                prepare_out(run_dir, force=True)
            else:
                run_dir.mkdir(parents=True)
            try:
                summary = run_experiment(cfg, run_dir, quiet=args.quiet, verbose=args.verbose)
            except RunFailed as err:
                failures.append(f"{run_dir.name}: {err}")
                summary = {"status": "failed"}
        else:
            print("  already completed with this config; skipped", file=sys.stderr)
        rows.append({"run": run_dir.name, **point, **_sweep_fields(summary, cfg)})
        _write_csv(out / "sweep.csv", rows)

    done = [r for r in rows if r["status"] == "completed"]
    plot_tradeoff(
        [{**r, "total_bytes": r["total_bytes_up"] + r["total_bytes_down"]} for r in done],
        out / "plots" / "accuracy_vs_total_bytes.png", "total_bytes", "run",
    )
    if any(r.get("epsilon") not in (None, "") for r in done):
        plot_tradeoff(done, out / "plots" / "accuracy_vs_epsilon.png", "epsilon", "run")
    plot_curves({r["run"]: read_metrics(out / r["run"]) for r in done}, out / "plots")
    print(report_table([out / r["run"] for r in rows]))
    print(f"sweep: {out.resolve()}  (sweep.csv, plots/, one directory per run)")
    if failures:
        print("fedlr: runs failed:\n" + "\n".join(failures), file=sys.stderr)
        return EXIT_FAILED
    return 0


def _completed_summary(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The summary of a finished run with exactly this config, else None (cache)."""
    try:
        status = json.loads((run_dir / "status.json").read_text())["status"]
        same = config_mod.load(run_dir / "config.toml") == cfg
        return json.loads((run_dir / "summary.json").read_text()) if status == "completed" and same else None
    except (OSError, KeyError, ValueError):
        return None


def _sweep_fields(summary: dict[str, Any], cfg: Config) -> dict[str, Any]:
    rounds = max(summary.get("rounds", 0), 1)
    row = {k: summary.get(k) for k in SWEEP_FIELDS}
    row["status"] = summary.get("status", "completed")
    if "total_bytes_up" in summary:
        row["bytes_up_per_round"] = summary["total_bytes_up"] / rounds
        row["bytes_down_per_round"] = summary["total_bytes_down"] / rounds
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def _run_dirs(paths: list[str]) -> list[Path]:
    dirs: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file() or (p / "metrics.jsonl").is_file():
            dirs.append(p)
        elif p.is_dir():
            found = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
            if not found:
                raise UsageError(f"{p}: no run directories (metrics.jsonl) inside")
            dirs.extend(found)
        else:
            raise UsageError(f"{p}: not a directory")
    return dirs


def report_table(run_dirs: list[Path]) -> str:
    """A Markdown table of runs: accuracy, bytes per round and in total, ε, time."""
    from fedlr.results import read_metrics, summarize

    lines = [
        "| run | method | dataset | rounds | final acc | best acc | up/round | down/round | total MB | ε | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in run_dirs:
        rows = read_metrics(d)
        if not rows:
            lines.append(f"| {d.name} | (no rounds) |||||||||| ")
            continue
        cfg = config_mod.load(d / "config.toml")
        s = summarize(cfg, rows)
        n = max(s["rounds"], 1)
        eps = f"{s['epsilon']:.2f}" if "epsilon" in s else "–"
        lines.append(
            f"| {d.name} | {s['method']} | {s['dataset']} | {s['rounds']} | {s['final_accuracy']:.4f} | "
            f"{s['best_accuracy']:.4f} | {s['total_bytes_up'] / n / 1e3:.1f} kB | {s['total_bytes_down'] / n / 1e3:.1f} kB | "
            f"{(s['total_bytes_up'] + s['total_bytes_down']) / 1e6:.2f} | {eps} | {s['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    dirs = _run_dirs(args.dirs)
    print(report_table(dirs))
    if args.plots:
        from fedlr.results import plot_curves, read_metrics

        plot_curves({d.name: read_metrics(d) for d in dirs}, Path(args.plots))
        print(f"plots: {Path(args.plots).resolve()}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fedlr.study import run_study

    try:
        return run_study(args.study, out=Path(args.out) if args.out else None, jobs=args.jobs,
                         overrides=args.set, quiet=args.quiet)
    except KeyboardInterrupt:
        # Not main()'s --resume hint: the study resumes by running the same command.
        print("fedlr: interrupted; run the same command again to resume (completed runs are cached)",
              file=sys.stderr)
        return 130


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from fedlr.deploy import run_local

    overrides = [*args.set, *( [f"num_clients={args.nodes}"] if args.nodes else [])]
    cfg = config_mod.load(args.config, overrides)
    out = Path(args.out) if args.out else _default_out(cfg).with_name("deploy-" + _default_out(cfg).name)
    prepare_out(out, force=args.force)
    # The deployed apps read this file (absolute path through flwr's run config).
    write_atomic(out / "config.toml", config_mod.dumps(cfg))
    summary = run_local(cfg, out / "config.toml", out, nodes=cfg["num_clients"], quiet=args.quiet)
    _print_summary(out, summary)
    return 0


def cmd_deploy_compose(args: argparse.Namespace) -> int:
    from fedlr.deploy import compose_yaml

    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: must be an integer >= 1")
    sys.stdout.write(compose_yaml(args.nodes, tls=args.tls, auth=args.auth, gpus=args.gpus))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedlr import bench

    overrides = dict(config_mod.parse_override(o) for o in args.set)
    if args.name == "overhead":
        print(bench.bench_overhead(overrides))
    elif args.name == "scale":
        try:
            per_round = [int(v) for v in args.per_round.split(",")]
        except ValueError:
            raise UsageError(f"--per-round {args.per_round!r}: expected integers like 10,100,1000") from None
        print(bench.bench_scale(overrides, per_round))
    else:
        print(bench.bench_methods())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    print(config_mod.describe())
    return 0


# --------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlr", description="Federated learning simulations on Flower + Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
        p.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")

    run = sub.add_parser("run", help="one experiment through Flower's simulation runtime (Ray)")
    run.add_argument("config", nargs="?", help="experiment TOML")
    run.add_argument("--out", help="results directory (default: results/<method>-<dataset>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last completed round")
    run.add_argument("--force", action="store_true", help="overwrite results already in --out")
    common(run)
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="the Cartesian product of --grid values, one run each")
    sweep.add_argument("config")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", required=True)
    sweep.add_argument("--out", help="sweep directory (default: results/sweep-<time>)")
    common(sweep)
    sweep.set_defaults(func=cmd_sweep)

    study = sub.add_parser("study", help="a privacy / communication trade-off study: codecs x privacy x data x seeds")
    study.add_argument("study", metavar="STUDY.toml")
    study.add_argument("--out", help="study directory (default: results/study-<file name>); re-running resumes")
    study.add_argument("--jobs", type=int, default=None,
                       help="runs at once, each with its share of the CPUs (default: half the cores, at least 1)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a [base] key")
    study.add_argument("-q", "--quiet", action="store_true", help="no per-run progress lines or final table")
    study.set_defaults(func=cmd_study)

    report = sub.add_parser("report", help="a Markdown table from run or sweep directories")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--plots", metavar="DIR", help="also write overlaid accuracy curves there")
    report.set_defaults(func=cmd_report)

    deploy = sub.add_parser("deploy", help="run on real Flower SuperLink/SuperNode processes")
    deploy_sub = deploy.add_subparsers(dest="target", required=True)
    local = deploy_sub.add_parser("local", help="the experiment on local SuperLink, SuperNodes and SuperExecs")
    local.add_argument("config")
    local.add_argument("--nodes", type=int, help="SuperNodes, one per client (sets num_clients)")
    local.add_argument("--out", help="results directory (default: results/deploy-<method>-<dataset>-<time>)")
    local.add_argument("--force", action="store_true", help="overwrite results already in --out")
    common(local)
    local.set_defaults(func=cmd_deploy_local)
    compose = deploy_sub.add_parser("compose", help="print the docker-compose file for N SuperNodes")
    compose.add_argument("--nodes", type=int, default=2)
    compose.add_argument("--tls", action="store_true", help="serve the SuperLink over TLS (deploy/gen-certs.sh)")
    compose.add_argument("--auth", action="store_true", help="accept only registered SuperNodes")
    compose.add_argument("--gpus", action="store_true", help="reserve a GPU for each ClientApp container")
    compose.set_defaults(func=cmd_deploy_compose)

    bench = sub.add_parser("bench", help="benchmarks with ratios against a reference in the same run")
    bench.add_argument("name", choices=("overhead", "scale", "methods"))
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the workload")
    bench.add_argument("--per-round", default="10,100,1000", help="scale: clients per round to measure")
    bench.set_defaults(func=cmd_bench)

    keys = sub.add_parser("keys", help="every configuration key with its default and allowed values")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fedlr: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlr: interrupted; completed rounds are in metrics.jsonl (resume with --resume DIR)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure as one message
        from fedlr.data import DatasetUnavailable
        from fedlr.runner import RunFailed

        from fedlr.deploy import DeployFailed

        if isinstance(err, DatasetUnavailable | RunFailed | DeployFailed):
            print(f"fedlr: run failed: {err}", file=sys.stderr)
            return EXIT_FAILED
        raise


def exit_now(code: int) -> None:
    """End the process with ``code`` once the atexit handlers have run, skipping the
    interpreter's teardown: freeing torch's, Flower's and Ray's modules object by
    object took 0.7 s at the end of every command, after everything was written."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console() -> None:
    """The ``fedlr`` console script: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


if __name__ == "__main__":
    console()
