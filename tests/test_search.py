"""search: optuna study in storage, resumable after SIGKILL, shared by workers, outputs, bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import user_error
from optuna.trial import TrialState

from pomq_deploy.cli.main import main
from pomq_deploy.plan import BlockBits, Plan, load_plan
from pomq_deploy.search.report import Row, mark_front, select

CLI = Path(sys.executable).parent / "pomq-deploy"


@pytest.fixture(scope="module")
def recipe(random_deit_fmnist, tmp_path_factory):
    from conftest import tiny_recipe_file

    path = tiny_recipe_file(tmp_path_factory.mktemp("search"), random_deit_fmnist)
    path.write_text(path.read_text() + "search: {mode: measured, eval_images: 16, batch: 1, latency_runs: 5, population: 4, "
                    "sensitivity_images: 4}\n")
    return path


def search_cmd(recipe, out: Path, *extra) -> list[str]:
    return [str(CLI), "search", "--recipe", str(recipe), "--out", str(out), "--allow-infeasible", *extra]


def complete_trials(out: Path, study: str) -> list:
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}")
    return s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def completed_count(db: Path) -> int:
    """Read the SQLite file directly: optuna.load_study could race the search creating its tables."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_search_writes_report_front_and_best_plan(recipe, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "--recipe", str(recipe), "--out", str(out), "--generations", "2", "--allow-infeasible", "--json",
                 "--full-front"]) == 0
    best = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "pareto.json").read_text())
    assert len(doc["trials"]) == 8 and len({t["plan_id"] for t in doc["trials"]}) == 8
    # --full-front: every front plan and both baselines scored on the whole split (16 images: multiples of 1/16)
    scored = [t["top1_full"] for t in doc["trials"] if t["on_front"]] + [doc["baselines"][b]["top1_full"] for b in ("fp32", "uniform8")]
    assert all(v is not None and (v * 16).is_integer() for v in scored)
    names = ", ".join(["FP32", "uniform 8/8/8", *(f"plan {t['plan_id']}" for t in doc["trials"] if t["on_front"])])
    assert f"top-1 on the full evaluation split of {names} (16 images, the first 16 known from the search)" in doc["meta"]["phases"]
    assert all(set(t) >= {"top1", "latency_ms", "size_bytes", "feasible", "constraints", "on_front"} for t in doc["trials"])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert report.splitlines()[0].startswith(("NO FEASIBLE PLAN", f"{sum(t['feasible'] for t in doc['trials'])} of 8"))
    feasible = [t for t in doc["trials"] if t["feasible"]]
    assert (best is None) == (not feasible)  # a feasible trial puts a plan on the front, and select() picks one
    if feasible:
        plan = load_plan(out / "best.yaml")
        assert plan.plan_id == best["plan_id"] and plan.is_mixed


def test_model_guided_search_measures_the_design_set_and_the_predicted_front(recipe, tmp_path, capsys):
    """--mode model within 15 real builds: the 2 baselines, the 11 design plans, then at most 2 plans of the
    predicted front; pareto.json marks predicted and measured points, the models and their errors are written,
    and best.yaml (if any) is a measured plan."""
    out = tmp_path / "m"
    assert main(["search", "--recipe", str(recipe), "--mode", "model", "--builds", "15", "--out", str(out),
                 "--allow-infeasible", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["meta"]["mode"] == "model" and doc["meta"]["builds"] <= 15
    sources = [t["source"] for t in doc["trials"]]
    assert sources.count("design") == 11 and 1 <= sources.count("front") <= 2
    assert all(t["latency_ratio_fp32"]["rounds"] >= 3 for t in doc["trials"])
    measured = {t["plan_id"] for t in doc["trials"]}
    predicted = doc["predicted_front"]
    assert predicted and all(p["measured"] == (p["plan_id"] in measured) for p in predicted)
    assert sum(p["measured"] for p in predicted) >= sources.count("front")  # a design probe may be on it too
    models = json.loads((out / "models.json").read_text())
    assert models["measured_on"]["backend"] == "ort-cpu" and len(models["accuracy"]["kl"]) == 12
    assert models["errors_on_measured_front"]["latency"]["n"] == sources.count("front")
    assert "## Models (`--mode model`)" in (out / "report.md").read_text()
    if best is not None:
        assert best["plan_id"] in measured and best["source"] in ("design", "front")


def test_model_mode_refuses_fewer_builds_than_its_design_set_before_building(recipe, tmp_path, capsys):
    err = user_error(["search", "--recipe", str(recipe), "--mode", "model", "--builds", "12", "--out", str(tmp_path / "s")],
                     capsys)
    assert ("--builds 12: the model-guided search builds the two baselines and the 11 design plans this study has "
                   "not measured (11 for this model and space) before it predicts a front; give --builds 13 or more (the "
                   "recipe's search.builds), or --mode measured") in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.onnx"))


def test_model_mode_refuses_measured_mode_options(recipe, tmp_path, capsys):
    err = user_error(["search", "--recipe", str(recipe), "--mode", "model", "--trials", "4", "--out", str(tmp_path)], capsys)
    assert "--algorithm, --trials and --generations apply to --mode measured; --mode model takes --builds" in err


def test_killed_search_resumes_without_losing_or_repeating_trials(recipe, tmp_path):
    out, study = tmp_path / "k", "resume"
    cmd = search_cmd(recipe, out, "--algorithm", "random", "--trials", "6", "--study", study)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and completed_count(out / "study.db") < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.user_attrs["plan_id"], t.values) for t in complete_trials(out, study)}
    assert 2 <= len(before) < 6 and not (out / "report.md").exists()
    resumed = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert f"resuming study {study} in sqlite:///" in resumed.stderr
    assert f": {len(before)} measured plan(s) kept, none measured again" in resumed.stderr
    after = complete_trials(out, study)
    assert len(after) == 6
    assert all(before[t.number] == (t.user_attrs["plan_id"], t.values) for t in after if t.number in before)
    assert set(before) <= {t.number for t in after}
    assert len({t.user_attrs["plan_id"] for t in after}) == 6  # no plan evaluated twice


def test_two_workers_share_one_study(recipe, tmp_path):
    out, study = tmp_path / "w", "shared"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    procs = [subprocess.Popen(search_cmd(recipe, out / f"r{i}", "--algorithm", "random", "--trials", "6", "--study", study,
                                         "--storage", storage, "--seed", str(i)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    trials = complete_trials(out, study)
    assert len(trials) >= 6 and len({t.user_attrs["plan_id"] for t in trials}) == len(trials)


def test_storage_that_cannot_be_opened(recipe, tmp_path, capsys):
    err = user_error(["search", "--recipe", str(recipe), "--out", str(tmp_path), "--storage", "nosuchdb://x/y"], capsys)
    assert "--storage nosuchdb://x/y: cannot open the study storage" in err


def test_a_study_name_that_would_leave_the_searches_folder(recipe, tmp_path, capsys, monkeypatch):
    """--study names the default output folder (searches/<study>): one path component, checked before anything."""
    monkeypatch.chdir(tmp_path)
    for bad in ("../../escape", "a/b", ".."):
        with pytest.raises(SystemExit) as e:  # argparse's own exit: its usage, then the one error line
            main(["search", "--recipe", str(recipe), "--study", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "argument --study" in err and "not allowed as a name" in err
    assert list(tmp_path.iterdir()) == []


def test_study_of_another_recipe(recipe, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = optuna.create_study(study_name="taken", storage=storage, directions=["maximize", "minimize", "minimize"])
    s.set_user_attr("recipe", "deit_fmnist")
    s.set_user_attr("scheme", "fqvit")
    err = user_error(["search", "--recipe", str(recipe), "--storage", storage, "--study", "taken", "--out", str(tmp_path)], capsys)
    assert "--study taken: belongs to recipe 'deit_fmnist'" in err


@pytest.mark.parametrize("argv", [["--algorithm", "genetic"], ["--select", "fastest"]])
def test_unknown_algorithm_or_select_rule(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", *argv])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _row(n, top1, lat, size, feasible=True):
    plan = Plan(recipe="m", scheme="fqvit", blocks=(BlockBits(w=4, a=8, attn=8),))
    return Row(n, plan, top1, lat, size, feasible, [0.0, 0.0, 0.0])


def _study_of(rows):
    """An in-memory study holding ``rows`` as trials, with the search's directions and constraints."""
    import optuna

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for r in rows:
        study.add_trial(optuna.trial.create_trial(values=[r.top1, r.latency_ms, r.size_bytes],
                                                  system_attrs={"constraints": [0.0 if r.feasible else 1.0]}))
    return study


def test_front_and_selection_rule():
    rows = [_row(0, 0.90, 10, 100), _row(1, 0.89, 8, 100), _row(2, 0.88, 9, 100), _row(3, 0.95, 1, 1, feasible=False),
            _row(4, 0.85, 5, 50)]
    front = mark_front(rows, _study_of(rows))
    assert [r.number for r in front] == [0, 1, 4]  # 2 is dominated by 1; 3 is infeasible
    base = {"uniform8": {"top1": 0.899}}
    assert select(front, base, "top1-within-1pt").number == 1  # 0 and 1 are within 1 point of 0.899: the faster
    assert select(front, {"uniform8": {"top1": 0.905}}, "top1-within-1pt").number == 0  # only 0 is
    assert select(front, base, "max-top1").number == 0 and select(front, base, "min-size").number == 4
    with pytest.raises(ValueError, match="unknown selection rule 'fastest'; allowed: top1-within-1pt, max-top1"):
        select([], base, "fastest")  # not silently the default rule, even with nothing to pick from


def test_selection_scores_on_the_full_split_only_what_decides():
    """Full-split top-1 costs a pass over the split per plan: the default rule asks for uniform 8-bit's, then for the
    front's plans from the fastest until one is within a point of it; plans tied on latency (one cached ratio)
    are all asked, the better one wins; min-latency asks nothing without a tie."""
    rows = [_row(0, 0.95, 10, 100), _row(1, 0.90, 8, 60), _row(2, 0.91, 6, 70), _row(3, 0.92, 6, 80), _row(4, 0.85, 5, 50)]
    full = {None: 0.90, 0: 0.93, 1: 0.895, 2: 0.89, 3: 0.885, 4: 0.80}
    asked = []

    def score(r):
        asked.append(None if r is None else r.number)
        return full[asked[-1]]

    assert select(rows, {}, "top1-within-1pt", score).number == 2  # 4 fails (0.80); 2 and 3 tie at 6 ms: 2 is better
    assert asked[0] is None and sorted(asked[1:]) == [2, 3, 4]
    asked.clear()
    assert select(rows, {}, "min-latency", score).number == 4 and asked == []
    assert select(rows, {}, "max-top1", score).number == 0 and sorted(asked) == [0, 1, 2, 3, 4]
    full[None] = 0.99  # nothing within a point: the most accurate, every plan asked
    assert select(rows, {}, "top1-within-1pt", score).number == 0


def test_an_accuracy_budget_selects_the_fastest_then_smallest_plan_within_it():
    """--max-drop 0.3 point: FP32 0.930 on the full split, so the floor is 0.927; the fastest plans (5 ms) miss it,
    of the two at 6 ms that make it the smaller wins; with a floor none makes, no plan (the caller names the closest)."""
    rows = [_row(0, 0.93, 10, 100), _row(1, 0.90, 5, 60), _row(2, 0.929, 6, 70), _row(3, 0.935, 6, 65), _row(4, 0.93, 8, 50)]
    full = {0: 0.931, 1: 0.92, 2: 0.928, 3: 0.927, 4: 0.93}
    pick = select(rows, {}, "top1-within-1pt", lambda r: full[r.number], max_drop=0.003, fp32_full=lambda: 0.930)
    assert pick.number == 3  # 0.927 is exactly at the floor (0.930 - 0.003 in floats): within it
    assert select(rows, {}, "top1-within-1pt", lambda r: full[r.number], max_drop=0.0, fp32_full=lambda: 0.932) is None
    # without the callables: the rows' own top-1 and FP32's on the full split, where base has it
    assert select(rows, {"fp32": {"top1": 0.93, "top1_full": 0.935}}, "max-top1", max_drop=0.006).number == 3
    assert select(rows, {"fp32": {"top1": 0.93, "top1_full": 0.94}}, "max-top1", max_drop=0.001) is None


def test_a_budget_picks_from_every_feasible_plan_not_only_the_subset_front():
    """On the search's images plan 0 dominates plan 1, so only 0 is on the front; on the whole split 0 misses a
    0.3-point budget and 1 meets it: the budget's answer is 1, off the front (without a budget: the front)."""
    from pomq_deploy.search.runner import candidates

    rows = [_row(0, 0.93, 5, 50), _row(1, 0.92, 6, 60), _row(2, 0.95, 1, 1, feasible=False)]
    front = mark_front(rows, _study_of(rows))
    assert [r.number for r in front] == [0] and candidates(rows, front, None) == front
    full = {0: 0.900, 1: 0.929}
    pool = candidates(rows, front, 0.003)
    assert [r.number for r in pool] == [0, 1]
    assert select(pool, {}, "top1-within-1pt", lambda r: full[r.number], max_drop=0.003, fp32_full=lambda: 0.930).number == 1


def test_a_study_of_another_space_or_budget_is_refused(tmp_path):
    from pomq_deploy.search.space import get_space
    from pomq_deploy.search.study import SearchConfig, SearchError, open_study

    cfg = SearchConfig("tiny", "fqvit", "random", 4, 4, 0, f"sqlite:///{tmp_path}/s.db", "one", space=get_space("engine", "ort"),
                       target="ort", max_drop=0.003)
    assert open_study(cfg).user_attrs["space"] == "engine"
    with pytest.raises(SearchError, match="searched the engine space of ort with --max-drop 0.3, not the paper space with no --max-drop"):
        open_study(SearchConfig("tiny", "fqvit", "random", 4, 4, 0, cfg.storage, "one"))
    with pytest.raises(SearchError, match="with --max-drop 0.3, not the engine space with no --max-drop"):
        open_study(SearchConfig("tiny", "fqvit", "random", 4, 4, 0, cfg.storage, "one", space=cfg.space, target="ort"))


def test_engine_space_search_with_an_accuracy_budget(recipe, tmp_path, capsys):
    """--space engine --mode model on ort-cpu: the design set holds each of the target's formats on every block and
    each alternating with 8/8/8; every measured plan is made of ort's formats; the sensitivities are per format;
    with a budget every plan meets (100 points), best.yaml is the fastest feasible plan, the smallest among ties."""
    from pomq_deploy.targets import get_target

    out = tmp_path / "e"
    assert main(["search", "--recipe", str(recipe), "--mode", "model", "--builds", "11", "--space", "engine",
                 "--max-drop", "100", "--out", str(out), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["meta"]["space"] == "engine" and doc["meta"]["max_drop"] == 1.0
    formats = {"/".join(map(str, s)) for s in get_target("ort").space()}
    assert all("/".join(str(b[g]) for g in ("w", "a", "attn")) in formats for t in doc["trials"] for b in t["plan"])
    assert [t["source"] for t in doc["trials"]].count("design") == 8
    assert all(set(k) == formats - {"float/float/float"} for k in doc["models"]["accuracy"]["kl"])
    feasible = [t for t in doc["trials"] if t["feasible"]]
    fastest = min(feasible, key=lambda t: (t["latency_ms"], t["size_bytes"]))
    assert best["plan_id"] == fastest["plan_id"] and load_plan(out / "best.yaml").plan_id == fastest["plan_id"]
    assert all("top1_vs_budget" in t["constraints"] for t in doc["trials"])
    assert "Search space `engine` (ort formats)" in (out / "report.md").read_text()


def test_model_check_states_how_far_apart_the_checked_plans_lie():
    """report.md puts the spans of the plans the models are checked on beside their measurements' spread: ratios
    0.600 and 0.630 (5.0% apart; intervals +-1% and +-3%: median +-2%), top-1 0.92 and 0.93 (10 of 1000 images)."""
    from dataclasses import replace

    from pomq_deploy.search.report import _spans

    timing = {"rounds": 6, "ms": 6.0, "reference_ms": 10.0}  # a trial's ratio as stored (timing.Ratio.as_dict)
    rows = [replace(_row(0, 0.92, 6.0, 1), ratio={"ratio": 0.6, "low": 0.594, "high": 0.606} | timing),
            replace(_row(1, 0.93, 6.3, 1), ratio={"ratio": 0.63, "low": 0.6111, "high": 0.6489} | timing)]
    (line, _) = _spans(rows, 1000)
    assert "span 0.600-0.630 (5.0%), their 90% intervals +-2.0% (median)" in line and "(10 of 1000 images)" in line
    assert _spans(rows[:1], 1000) == []  # nothing to compare with one plan


@pytest.mark.parametrize("error, retried", [
    ('(psycopg.errors.DuplicateTable) relation "studies" already exists', True),  # PostgreSQL: two workers, one new database
    ("(psycopg.errors.InsufficientPrivilege) permission denied for schema public", False)])
def test_a_worker_that_loses_the_race_to_create_the_tables_tries_again(error, retried, tmp_path, monkeypatch):
    """Two workers started at once on a new PostgreSQL database both create optuna's tables; the loser's error
    (a ProgrammingError there) means the tables now exist, so it opens the storage again. Other errors are one line."""
    import sqlalchemy

    from pomq_deploy.search import study as study_module
    from pomq_deploy.search.study import SearchConfig, SearchError, open_study

    real, calls = optuna.storages.RDBStorage, []

    class Storage(real):  # optuna checks isinstance(storage, RDBStorage)
        def __init__(self, url, **kwargs):
            calls.append(url)
            if len(calls) == 1:
                raise sqlalchemy.exc.ProgrammingError("CREATE TABLE studies", {}, Exception(error))
            super().__init__(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Storage)
    monkeypatch.setattr(study_module.time, "sleep", lambda s: None)
    cfg = SearchConfig("tiny", "fqvit", "random", 4, 4, 0, f"sqlite:///{tmp_path}/s.db", "race")
    if retried:
        assert open_study(cfg).user_attrs["recipe"] == "tiny" and len(calls) == 2
    else:
        with pytest.raises(SearchError, match="cannot open the study storage .*permission denied for schema public"):
            open_study(cfg)
        assert len(calls) == 1


def test_hypervolume_by_hand():
    """Normalised (1 - top-1, latency / FP32's, size / uniform 8-bit's) against (1, 1, 1): one plan at
    (0.5, 0.5, 0.5) spans 0.125; a second at (0.75, 0.25, 0.5) adds 0.25 x 0.25 x 0.5; infeasible ones count nothing."""
    from pomq_deploy.search.report import hypervolume

    base = {"fp32": {"latency_ms": 10.0}, "uniform8": {"size_bytes": 100}}
    rows = [_row(0, 0.5, 5.0, 50), _row(1, 0.25, 2.5, 50), _row(2, 0.99, 0.1, 1, feasible=False)]
    assert hypervolume(rows[:1], base) == pytest.approx(0.125)
    assert hypervolume(rows, base) == pytest.approx(0.125 + 0.25 * 0.25 * 0.5)
    base["fp32"]["size_bytes"] = 200  # the engine space holds sizes against FP32's: each plan at half the size again
    assert hypervolume(rows[:1], base, "fp32") == pytest.approx(0.5 * 0.5 * 0.75)


def test_held_out_plans_are_scored_in_one_pass_and_timed_together(recipe):
    """The models' held-out check (tools/search_study.py) and the front's re-measure: plans built and scored on the
    whole split in one pass over it (the same top-1 as each evaluated alone), then timed in the same interleaved
    rounds with FP32 and uniform 8-bit (which may be one of them), each getting its own ratio."""
    from pomq_deploy.backends import get_backend
    from pomq_deploy.measure import evaluate_artifact
    from pomq_deploy.plan import uniform_plan
    from pomq_deploy.progress import Phases
    from pomq_deploy.recipe import load_recipe
    from pomq_deploy.search.evaluator import PlanEvaluator

    ev = PlanEvaluator(load_recipe(str(recipe)), "fqvit", "nearest", get_backend("ort-cpu"), "ort", 8, 1, runs=2)
    try:
        plans = [uniform_plan(s, ev.num_blocks, "tiny", "fqvit") for s in ("4/8/8", "8/8/4")]
        phases = Phases(None)
        top1 = ev.full_top1([*plans, None], phases)  # built now, never evaluated: every image is run
        assert ev.builds == 2 + 1 and list(phases.seconds)[0].endswith("(16 images, the first 0 known from the search)")
        alone = [evaluate_artifact(ev.backend, ev.kept[p.plan_id].artifact, ev.full_recipe) for p in plans]
        assert top1[:2] == [a.top1 for a in alone] and alone[0].images == 16
        # a plan the search measured: its hits on the subset (8 images) are known, only the other 8 run
        third = uniform_plan("4/4/4", ev.num_blocks, "tiny", "fqvit")
        ev.measure(third)
        assert ev.full_top1([third, None], phases) == [evaluate_artifact(ev.backend, ev.kept[third.plan_id].artifact,
                                                                         ev.full_recipe).top1, top1[2]]
        assert list(phases.seconds)[1].endswith("(16 images, the first 8 known from the search)")
        plans.append(third)
        ratios = ev.time_together([*plans, ev.uniform8()], max_rounds=3, tolerance=1.0)  # a tolerance every ratio meets
        assert [r.rounds for r in ratios] == [3, 3, 3, 3] and all(r.low <= r.ratio <= r.high for r in ratios)
        assert ev.builds == 3 + 2  # the plans, FP32 and uniform 8-bit: nothing rebuilt for the timing
    finally:
        ev.close()
