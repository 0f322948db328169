"""``fedlr study``: expansion, validation, aggregation, Pareto fronts, outputs, caching."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from fedlr import config
from fedlr import study as st
from fedlr.results import write_atomic
from tests.conftest import run_cli

STUDY = """\
title = "unit"
seeds = [0, 1]
accuracy_target = 0.5
exclude = [{codec = "mud*", privacy = "dp*"}]

[base]
model = "mlp"
width = 32
rounds = 2
num_clients = 4
clients_per_round = 2
lr = 0.1

[datasets]
digits = {dataset = "digits"}

[splits]
iid = {partition = "iid"}
"dir0.5" = {partition = "dirichlet", alpha = 0.5}

[codecs]
dense = {method = "fedavg", lr = 0.2}
mud-16 = {method = "fedmud", fedmud = {ratio = 0.25}}

[privacy]
none = {}
dp-eps8 = {"privacy.mechanism" = "dpsgd", "privacy.epsilon" = 8, lr = 0.3}
"""


def write_study(tmp_path: Path, text: str = STUDY, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ expansion and naming
def test_expand_is_the_product_minus_exclusions_in_order(tmp_path: Path) -> None:
    study = st.load_study(write_study(tmp_path))
    points, skipped = st.expand(study)
    assert [p.name for p in points] == [
        f"digits_{split}_{codec}_{privacy}_s{seed}"
        for split in ("iid", "dir0.5") for codec, privacy in (("dense", "none"), ("dense", "dp-eps8"),
                                                              ("mud-16", "none"))
        for seed in (0, 1)
    ]
    assert [(s.config_name, s.kind, s.reason) for s in skipped] == [
        ("digits_iid_mud-16_dp-eps8", "excluded", "exclude[0]"),
        ("digits_dir0.5_mud-16_dp-eps8", "excluded", "exclude[0]"),
    ]
    by_name = {p.name: p.cfg for p in points}
    # base < dataset < split < codec < privacy < seed; the results are resolved configs.
    cfg = by_name["digits_dir0.5_dense_dp-eps8_s1"]
    assert cfg == config.resolve(
        {"model": "mlp", "width": 32, "rounds": 2, "num_clients": 4, "clients_per_round": 2, "dataset": "digits",
         "partition": "dirichlet", "alpha": 0.5, "method": "fedavg", "privacy.mechanism": "dpsgd",
         "privacy.epsilon": 8, "lr": 0.3, "seed": 1})
    assert by_name["digits_iid_dense_none_s0"]["lr"] == 0.2
    assert by_name["digits_iid_mud-16_none_s0"]["fedmud.ratio"] == 0.25  # nested tables flatten


def test_set_overrides_the_base_and_exclude_matches_config_values(tmp_path: Path) -> None:
    text = STUDY.replace('exclude = [{codec = "mud*", privacy = "dp*"}]',
                         'exclude = [{method = "fedmud", "privacy.mechanism" = "dp*"}, {split = "dir*"}]')
    study = st.load_study(write_study(tmp_path, text), ["rounds=5"])
    points, skipped = st.expand(study)
    assert {p.config_name for p in points} == {"digits_iid_dense_none", "digits_iid_dense_dp-eps8",
                                               "digits_iid_mud-16_none"}
    assert all(p.cfg["rounds"] == 5 for p in points)
    assert [s.reason for s in skipped] == ["exclude[0]", "exclude[1]", "exclude[1]", "exclude[1]", "exclude[0]"]


def test_invalid_combinations_are_skipped_only_when_asked(tmp_path: Path) -> None:
    text = STUDY.replace('exclude = [{codec = "mud*", privacy = "dp*"}]\n', "")
    with pytest.raises(st.StudyError) as err:
        st.expand(st.load_study(write_study(tmp_path, text)))
    assert str(err.value) == (
        f"{tmp_path / 's.toml'}: dataset=digits split=iid codec=mud-16 privacy=dp-eps8 is invalid: "
        "privacy.mechanism = 'dpsgd': not available for method = 'fedmud'; methods with DP-SGD clients: "
        f"{', '.join(config.DPSGD_METHODS)}; exclude it with an exclude rule or set skip_invalid = true"
    )
    points, skipped = st.expand(st.load_study(write_study(tmp_path, "skip_invalid = true\n" + text)))
    assert len(points) == 12
    assert [(s.config_name, s.kind) for s in skipped] == [("digits_iid_mud-16_dp-eps8", "invalid"),
                                                           ("digits_dir0.5_mud-16_dp-eps8", "invalid")]
    assert skipped[0].reason.startswith("privacy.mechanism = 'dpsgd': not available for method = 'fedmud'")


@pytest.mark.parametrize(("edit", "message"), [
    (("[codecs]\n", "[codecs]\nbad = {fedmud = {ratoi = 0.1}}\n"),
     "codecs.bad: unknown key 'fedmud.ratoi'; did you mean 'fedmud.ratio'?"),
    (("lr = 0.2}", "lr = -1}"), "codecs.dense: lr = -1: must be a number > 0"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "seeds: must be a non-empty list of distinct integers >= 0, got [0, 0]"),
    (("accuracy_target = 0.5", "accuracy_target = 50"), "accuracy_target: must be a number in (0, 1], got 50"),
    (('privacy = "dp*"', 'privacy = "dpp*"'),
     "exclude[0]: privacy = 'dpp*': matches no entry of [privacy] (none, dp-eps8)"),
    (("[base]\n", "[base]\nseed = 3\n"), "[base]: seed: set by the study's seeds list, not by overrides"),
    (('"dir0.5" = ', '"dir/0.5" = '), "splits.'dir/0.5': entry names must be letters, digits, '.', '+' and '-' "
                                       "(they become directory names)"),
    (("[splits]\n", "[split]\n"), "unknown key 'split' (did you mean 'splits'?)"),
])
def test_study_file_errors_exit_2_with_one_line(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write_study(tmp_path, STUDY.replace(*edit))
    with pytest.raises(st.StudyError) as err:
        st.expand(st.load_study(path))
    assert str(err.value) == f"{path}: {message}"


def test_cli_errors_are_one_line_and_nothing_runs(tmp_path: Path) -> None:
    bad = write_study(tmp_path, STUDY.replace('exclude = [{codec = "mud*", privacy = "dp*"}]\n', ""))
    proc = run_cli("study", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"fedlr: error: {bad}: dataset=digits split=iid codec=mud-16 privacy=dp-eps8 is invalid: "
        "privacy.mechanism = 'dpsgd': not available for method = 'fedmud'; methods with DP-SGD clients: "
        f"{', '.join(config.DPSGD_METHODS)}; exclude it with an exclude rule or set skip_invalid = true\n"
    )
    assert not (tmp_path / "out").exists()
    proc = run_cli("study", str(write_study(tmp_path)), "--set", "rounds=0")
    assert (proc.returncode, proc.stderr) == (2, f"fedlr: error: {tmp_path / 's.toml'}: --set rounds=0: "
                                                 "rounds = 0: must be an integer >= 1\n")
    proc = run_cli("study", str(tmp_path / "missing.toml"))
    assert (proc.returncode, proc.stderr) == (2, f"fedlr: error: study file '{tmp_path / 'missing.toml'}' "
                                                 "does not exist\n")


# ------------------------------------------------------------------ numbers
def test_mean_std_is_the_sample_std_over_present_values() -> None:
    assert st.mean_std([1.0, 2.0, 3.0, None]) == (2.0, 1.0)
    assert st.mean_std([0.5]) == (0.5, 0.0)
    assert st.mean_std([None, None]) == (None, None)


def test_pareto_front_on_hand_made_points() -> None:
    points = [
        (0.90, 100.0),   # best accuracy: optimal
        (0.80, 10.0),    # optimal
        (0.80, 20.0),    # dominated by (0.80, 10): same accuracy, more cost
        (0.70, 10.0),    # dominated by (0.80, 10): same cost, less accuracy
        (0.60, 1.0),     # cheapest: optimal
        (0.90, 100.0),   # identical to the first: both optimal
        (None, 0.5),     # no accuracy (failed): never optimal
        (0.95, None),    # no cost is infinite cost; still the most accurate
    ]
    # (0.90, 100)'s twin is not strictly better in either, so both stay optimal.
    assert st.pareto_front(points) == [True, True, False, False, True, True, False, True]
    assert st.pareto_front([(0.5, math.inf), (0.4, math.inf)]) == [True, False]


def test_bytes_to_target_is_cumulative_at_the_first_round_reaching_it() -> None:
    rows = [{"round": r, "test_accuracy": a, "bytes_up": u, "bytes_down": d}
            for r, a, u, d in ((0, 0.1, 0, 0), (1, 0.4, 10, 20), (2, 0.6, 10, 20), (3, 0.5, 10, 20))]
    assert st.bytes_to_target(rows, 0.6) == 60
    assert st.bytes_to_target(rows, 0.05) == 0   # the initial model already meets it
    assert st.bytes_to_target(rows, 0.61) is None


def _row(codec: str, privacy: str, seed: int, acc: float | None, total: int = 100, eps: float | None = None,
         to_target: int | None = None, split: str = "iid") -> dict:
    return {"run": f"{codec}-{privacy}-{seed}", "dataset": "d", "split": split, "codec": codec,
            "privacy": privacy, "seed": seed, "method": "fedavg", "mechanism": "none" if eps is None else "ldp",
            "status": "failed" if acc is None else "completed", "cached": "no", "final_accuracy": acc,
            "best_accuracy": acc, "total_bytes": None if acc is None else total,
            "bytes_per_round": None if acc is None else total / 2, "epsilon": eps, "wall_s": 1.0,
            "bytes_to_target": to_target}


def test_aggregate_means_over_completed_seeds_and_marks_pareto_per_split() -> None:
    rows = [
        _row("dense", "none", 0, 0.8, 1000, to_target=500), _row("dense", "none", 1, 0.6, 1000, to_target=None),
        _row("mud", "none", 0, 0.7, 100, to_target=50), _row("mud", "none", 1, None),
        _row("dense", "ldp", 0, 0.5, 1000, eps=10.0), _row("dense", "ldp", 1, 0.5, 1000, eps=20.0),
        _row("dense", "none", 0, 0.1, 1000, split="dir"),
    ]
    out = {(r["split"], r["codec"], r["privacy"]): r for r in st.aggregate(rows)}
    dense = out[("iid", "dense", "none")]
    assert dense["final_accuracy_mean"] == pytest.approx(0.7)
    assert dense["final_accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert (dense["n_seeds"], dense["n_failed"], dense["status"], dense["n_reached_target"]) == (2, 0, "completed", 1)
    assert not st.reaches_target(dense)
    mud = out[("iid", "mud", "none")]
    assert (mud["n_seeds"], mud["n_failed"], mud["status"], mud["final_accuracy_std"]) == (1, 1, "partial", 0.0)
    assert st.reaches_target(mud) and mud["bytes_to_target_mean"] == 50
    ldp = out[("iid", "dense", "ldp")]
    assert (ldp["epsilon_mean"], ldp["epsilon_std"]) == (15.0, pytest.approx(math.sqrt(50)))
    # (acc, bytes): dense 0.7 @ 1000 and mud 0.7 @ 100 -> mud dominates dense; ldp is worse and as costly.
    assert [out[k]["pareto_bytes"] for k in [("iid", "dense", "none"), ("iid", "mud", "none"),
                                               ("iid", "dense", "ldp")]] == [False, True, False]
    # (acc, eps): the non-private ones are eps = inf, equal accuracy -> both optimal; ldp is the cheapest.
    assert [out[k]["pareto_epsilon"] for k in [("iid", "dense", "none"), ("iid", "mud", "none"),
                                                 ("iid", "dense", "ldp")]] == [True, True, True]
    assert out[("dir", "dense", "none")]["pareto_bytes"]  # fronts are per dataset x split


# ------------------------------------------------------------------ outputs (no Ray)
def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def check_report_agrees(out: Path) -> None:
    """report.md shows study.csv's numbers and Pareto flags, row by row."""
    report = (out / "report.md").read_text()
    table = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 14 and cells[0] not in ("dataset", "---"):
            table[tuple(cells[:4])] = cells
    rows = _read_csv(out / "study.csv")
    assert len(table) == len(rows)
    pm = lambda r, k, f: f"{float(r[k + '_mean']):{f}} ± {float(r[k + '_std']):{f}}"  # noqa: E731
    for r in rows:
        cells = table[(r["dataset"], r["split"], r["codec"], r["privacy"])]
        if int(r["n_seeds"]) == 0:
            assert cells[5] == "–"
            continue
        assert cells[5] == pm(r, "final_accuracy", ".4f")
        assert cells[6] == pm(r, "best_accuracy", ".4f")
        assert cells[7] == f"{float(r['total_bytes_mean']) / 1e6:.3f} ± {float(r['total_bytes_std']) / 1e6:.3f}"
        assert cells[9] == ("∞" if r["epsilon_mean"] == "" else pm(r, "epsilon", ".2f"))
        assert cells[12] == ("**yes**" if r["pareto_bytes"] == "True" else "")
        assert cells[13] == ("**yes**" if r["pareto_epsilon"] == "True" else "")
    # The Pareto lists name exactly the flagged configurations.
    for r in rows:
        section = report.split(f"### {r['dataset']} / {r['split']}\n")[1].split("\n###")[0]
        listed_bytes = section.split("- accuracy vs total bytes: ")[1].splitlines()[0]
        listed_eps = section.split("- accuracy vs ε: ")[1].splitlines()[0]
        name = f"{r['codec']} + {r['privacy']} (acc "
        assert (name in listed_bytes) == (r["pareto_bytes"] == "True")
        assert (name in listed_eps) == (r["pareto_epsilon"] == "True")


class FakeRuns:
    """A launcher that writes a plausible finished run without training (no Ray)."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.fail = fail
        self.calls: list[str] = []

    def __call__(self, point: st.Point, run_dir: Path, env: dict[str, str]) -> None:
        self.calls.append(point.name)
        assert json.loads(env["RAY_OVERRIDE_RESOURCES"])["CPU"] >= 1
        cfg = point.cfg
        write_atomic(run_dir / "config.toml", config.dumps(cfg))
        if point.name in self.fail:
            write_atomic(run_dir / "status.json", json.dumps({"status": "failed", "error": "client 1 failed:\nboom"}))
            return
        size = 1000 if cfg["method"] == "fedavg" else 100
        accs = [0.1, 0.3 + 0.1 * point.seed, 0.5 + 0.1 * point.seed + (0.1 if cfg["method"] == "fedavg" else 0)]
        rows = [{"round": r, "test_accuracy": a, "bytes_up": size * (r > 0), "bytes_down": size * (r > 0),
                 **({"epsilon": 4.0 * r} if cfg["privacy.mechanism"] != "none" else {})}
                for r, a in enumerate(accs)]
        write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        summary = {"method": cfg["method"], "rounds": 2, "final_accuracy": accs[-1], "best_accuracy": max(accs[1:]),
                   "total_bytes_up": 2 * size, "total_bytes_down": 2 * size, "wall_s": 1.5,
                   **({"epsilon": 8.0} if cfg["privacy.mechanism"] != "none" else {})}
        write_atomic(run_dir / "summary.json", json.dumps(summary))
        write_atomic(run_dir / "status.json", json.dumps({"status": "completed"}))


def test_study_outputs_agree_and_a_rerun_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_study(tmp_path)
    out = tmp_path / "out"
    fake = FakeRuns(fail={"digits_dir0.5_mud-16_none_s1"})
    assert st.run_study(path, out=out, jobs=2, launcher=fake) == 1  # one run failed: exit 1, outputs written
    assert len(fake.calls) == 12
    # Seed-major order: every configuration once before any second seed.
    assert all(name.endswith("_s0") for name in fake.calls[:6])
    err = capsys.readouterr().err
    # Two jobs finish in either order: the counter is the completion order, not the run's index.
    assert re.search(r"^\[\d+/12\] digits_iid_dense_none_s0  acc=0\.6000 bytes=4\.0 kB eps=–  \(", err, re.M)
    assert "FAILED: client 1 failed: boom" in err

    for name in ("runs.csv", "study.csv", "skipped.csv", "report.md", "plots/accuracy_vs_bytes.png",
                 "plots/accuracy_vs_epsilon.png", "plots/bytes_vs_epsilon.png"):
        assert (out / name).is_file(), name
    runs = _read_csv(out / "runs.csv")
    assert [r["run"] for r in runs] == [p.name for p in st.expand(st.load_study(path))[0]]
    failed = [r for r in runs if r["status"] == "failed"]
    assert [(r["run"], r["error"]) for r in failed] == [("digits_dir0.5_mud-16_none_s1", "client 1 failed: boom")]
    dense = next(r for r in runs if r["run"] == "digits_iid_dense_none_s1")
    assert (dense["final_accuracy"], dense["total_bytes"], dense["bytes_to_target"]) == ("0.7", "4000", "4000")
    study_rows = _read_csv(out / "study.csv")
    assert len(study_rows) == 6
    mud = next(r for r in study_rows if r["split"] == "dir0.5" and r["codec"] == "mud-16")
    assert (mud["n_seeds"], mud["n_failed"], mud["status"]) == ("1", "1", "partial")
    assert [r["kind"] for r in _read_csv(out / "skipped.csv")] == ["excluded", "excluded"]
    check_report_agrees(out)
    report = (out / "report.md").read_text()
    assert "- dataset=digits split=iid codec=mud-16 privacy=dp-eps8: excluded by exclude[0]" in report
    assert "- `digits_dir0.5_mud-16_none_s1`: client 1 failed: boom" in report

    # Re-run: the completed runs are cached, only the failed one runs again.
    again = FakeRuns()
    assert st.run_study(path, out=out, jobs=1, launcher=again) == 0
    assert again.calls == ["digits_dir0.5_mud-16_none_s1"]
    runs = _read_csv(out / "runs.csv")
    assert [r["cached"] for r in runs].count("yes") == 11
    assert "(cached)" in capsys.readouterr().err
    check_report_agrees(out)
    # A changed config (here: --set) is a different run; nothing stale is reused.
    changed = FakeRuns()
    assert st.run_study(path, out=out, jobs=1, overrides=["rounds=3"], launcher=changed, quiet=True) == 0
    assert len(changed.calls) == 12


def test_run_env_gives_each_run_its_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st.os, "cpu_count", lambda: 8)
    cfg = config.resolve({})
    env = st.run_env(cfg, 4)
    assert (json.loads(env["RAY_OVERRIDE_RESOURCES"]), env["OMP_NUM_THREADS"]) == ({"CPU": 2}, "2")
    # A client needing more CPUs than the share still gets one slot (else Ray would never place it).
    env = st.run_env(config.resolve({"simulation.num_cpus": 3}), 8)
    assert json.loads(env["RAY_OVERRIDE_RESOURCES"]) == {"CPU": 3}


# ------------------------------------------------------------------ end to end (Ray)
TINY_STUDY = """\
seeds = [0, 1]
accuracy_target = 0.3
[base]
model = "mlp"
width = 32
rounds = 1
num_clients = 2
clients_per_round = 2
lr = 0.1
[datasets]
digits = {dataset = "digits"}
[splits]
iid = {partition = "iid"}
[codecs]
dense = {method = "fedavg"}
[privacy]
none = {}
"""


@pytest.mark.ray
def test_tiny_study_end_to_end_then_cached(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY, "tiny.toml")
    out = tmp_path / "out"
    proc = run_cli("study", str(path), "--out", str(out), "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[2/2\] digits_iid_dense_none_s\d  acc=0\.\d{4} bytes=\S+ kB eps=–  \(\d+ s\)", proc.stderr)
    runs = _read_csv(out / "runs.csv")
    assert [(r["run"], r["status"], r["cached"]) for r in runs] == [
        ("digits_iid_dense_none_s0", "completed", "no"), ("digits_iid_dense_none_s1", "completed", "no")]
    for r in runs:
        summary = json.loads((out / "runs" / r["run"] / "summary.json").read_text())
        assert float(r["final_accuracy"]) == summary["final_accuracy"]
        assert int(r["total_bytes"]) == summary["total_bytes_up"] + summary["total_bytes_down"]
    for name in ("plots/accuracy_vs_bytes.png", "plots/accuracy_vs_epsilon.png", "plots/bytes_vs_epsilon.png"):
        assert (out / name).stat().st_size > 0
    check_report_agrees(out)

    files = [out / "runs" / r["run"] / name for r in runs for name in ("metrics.jsonl", "log.txt", "summary.json")]
    before = [p.stat().st_mtime_ns for p in files]
    again = run_cli("study", str(path), "--out", str(out), "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("(cached)") == 2
    assert [r["cached"] for r in _read_csv(out / "runs.csv")] == ["yes", "yes"]
    assert [p.stat().st_mtime_ns for p in files] == before  # no run process started, nothing rewritten
    check_report_agrees(out)
