"""search on a real PostgreSQL server: two workers share one study URL, one is SIGKILLed mid-trial and restarted.

The server is a throwaway one (initdb + pg_ctl into a temp dir, unix socket only), so the test needs the server
binaries (Debian's ``postgresql`` package) and psycopg (``pip install -e '.[postgres]'``); without them it skips.
"""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
import timm
import torch
from conftest import make_fmnist
from optuna.trial import TrialState
from safetensors.torch import save_file

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
pytestmark = pytest.mark.postgres

CLI = Path(sys.executable).parent / "pomq-deploy"
STUDY = "pg-shared"
# pomq_deploy.search.study reads these from POMQ_HEARTBEAT_S / POMQ_GRACE_S. A live trial's heartbeat was seen up to
# 1.9 s old here (2 cores, a build holding the GIL): the grace period keeps clear of that, or live trials would be failed
HEARTBEAT_S, GRACE_S = 1, 4
# enough that the surviving worker still starts trials once the killed one's grace period is over (it does ~2 a second)
TRIALS = 24


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<major>/bin (kept off PATH)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent  # the real directory: pg_ctl finds the postgres binary beside itself
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return majors[-1].parent if majors else None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own for this module, listening on a unix socket only (no port to collide on);
    stopped and deleted at the end, however the test ends."""
    bindir = pg_bindir()
    if bindir is None or not (bindir / "initdb").is_file():
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    run_as = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: use the account Debian's package creates
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    # not pytest's tmp_path: root's is private to root, and the socket path must stay short (107 bytes)
    root = Path(tempfile.mkdtemp(prefix="pomq-pg-", dir="/tmp" if run_as else None))
    data, log = root / "data", root / "server.log"

    def pg(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / argv[0]), *argv[1:]], cwd=root, capture_output=True, text=True, timeout=60, **run_as)

    def why(r: subprocess.CompletedProcess) -> str:
        """The server's or the tool's own error line, for a one-line skip reason."""
        lines = ((log.read_text() if log.is_file() else "") + r.stderr).splitlines()
        errors = [x.strip() for x in lines if "FATAL" in x or "error" in x.lower()]
        return (errors or [x.strip() for x in lines if x.strip()] or [f"exit status {r.returncode}"])[-1]

    try:
        if run_as:
            os.chown(root, run_as["user"], run_as["group"])
        r = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if r.returncode:
            pytest.skip(f"initdb failed: {why(r)}")
        # -F: no fsync, a throwaway cluster; listen_addresses='': no TCP at all, the socket lives in root
        r = pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", f"-F -c listen_addresses='' -k '{root}'", "start")
        if r.returncode:
            pytest.skip(f"PostgreSQL did not start: {why(r)}")
        yield f"postgresql+psycopg://postgres@/postgres?host={root}"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A 2-block, 64-wide deit_fmnist with random weights on generated data: a trial takes about a second."""
    folder = tmp_path_factory.mktemp("pg-recipe")
    kwargs = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    torch.manual_seed(0)
    checkpoint = folder / "tiny2.safetensors"
    save_file(timm.create_model("deit_fmnist", **kwargs).state_dict(), str(checkpoint))
    data = make_fmnist(folder / "fm", n_train=30, n_test=16)
    path = folder / "tiny2.yaml"
    path.write_text(f"name: tiny2\nmodel: {{arch: deit_fmnist, checkpoint: {checkpoint}, kwargs: {json.dumps(kwargs)}}}\n"
                    f"data: {{kind: fashion_mnist, root: {data}, calib_images: 20, calib_batch: 10}}\n"
                    "search: {eval_images: 8, batch: 1, latency_runs: 5}\n")
    return path


def rows(engine: sa.Engine, sql: str) -> list:
    """``sql`` on the study's tables; nothing before a worker has created them."""
    try:
        with engine.connect() as con:
            return con.execute(sa.text(sql), {"study": STUDY}).all()
    except sa.exc.ProgrammingError:  # undefined table
        return []


def numbers(engine: sa.Engine, state: str, beating: bool = False) -> set[int]:
    """Trials in ``state``; with ``beating``, only those with a heartbeat (optuna can fail no others when stale)."""
    join = "JOIN trial_heartbeats h USING (trial_id) " if beating else ""
    return {n for (n,) in rows(engine, f"SELECT t.number FROM trials t JOIN studies s USING (study_id) {join}"
                                       f"WHERE s.study_name = :study AND t.state = '{state}'")}


def test_two_workers_on_postgres_one_killed_mid_trial(postgres_url, recipe, tmp_path):
    env = os.environ | {"POMQ_HEARTBEAT_S": str(HEARTBEAT_S), "POMQ_GRACE_S": str(GRACE_S)}
    logs = {}

    def start(name: str, seed: int) -> subprocess.Popen:
        cmd = [str(CLI), "search", "--recipe", str(recipe), "--out", str(tmp_path / name), "--storage", postgres_url, "--study", STUDY,
               "--mode", "measured", "--algorithm", "random", "--trials", str(TRIALS), "--seed", str(seed), "--allow-infeasible"]
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "a") as log:  # its own process group: the kill takes everything it runs
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def said(*names: str) -> str:
        return "".join(f"\n{n}'s output:\n{logs[n].read_text()[-3000:]}" for n in names)

    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    a, b = start("a", 1), start("b", 2)
    procs = [a, b]
    deadline = time.monotonic() + 100
    try:
        # Kill a mid-trial: stop it (SIGSTOP) when two trials with heartbeats are RUNNING and look again; b runs one
        # trial at a time, so if two still are, one is a's. Otherwise a had just finished one: let it go on.
        while True:
            assert time.monotonic() < deadline and a.poll() is None and b.poll() is None, "a never seen mid-trial" + said("a", "b")
            before = numbers(engine, "COMPLETE")
            assert len(before) <= TRIALS // 4, "too late to kill a: b could finish before a's trial goes stale"
            if before and len(numbers(engine, "RUNNING", beating=True)) == 2:
                os.killpg(a.pid, signal.SIGSTOP)
                time.sleep(0.2)  # a request a sent before it stopped lands meanwhile
                pair, before = numbers(engine, "RUNNING", beating=True), numbers(engine, "COMPLETE")
                if len(pair) == 2:
                    os.killpg(a.pid, signal.SIGKILL)
                    a.wait()
                    break
                os.killpg(a.pid, signal.SIGCONT)
            time.sleep(0.1)
        # b, alone, fails a's trial once its heartbeat is GRACE_S old (optuna does so as b starts its next trial) and
        # finishes trials of its own; then a comes back with the same arguments
        killed_at = time.monotonic()
        while b.poll() is None and time.monotonic() < killed_at + GRACE_S + 10:
            if numbers(engine, "FAIL") and numbers(engine, "COMPLETE") - before:
                break
            time.sleep(0.2)
        by_b = numbers(engine, "COMPLETE") - before
        a = start("a", 1)
        procs.append(a)
        for name, p in (("b", b), ("a", a)):
            assert p.wait(timeout=max(1, deadline - time.monotonic())) == 0, said(name)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        engine.dispose()

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    complete = {t.number: t for t in trials if t.state == TrialState.COMPLETE}
    # each worker checks the count as it starts a trial, so the one still measuring may add one more
    assert TRIALS <= len(complete) <= TRIALS + 1, sorted(complete)
    assert len({t.user_attrs["plan_id"] for t in complete.values()}) == len(complete)  # no plan evaluated twice
    assert before <= set(complete)  # no finished trial lost
    # a's trial, one of the pair, was failed through optuna's heartbeat; nothing else failed (no live trial taken for stale)
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert len(failed) == 1 and failed[0] in pair and not running, f"failed {failed}, still running {running}, a's among {pair}"
    # a's final report holds the trials finished before the kill and those b finished while a was dead
    assert by_b, "b finished no trial while a was dead" + said("b")
    reported = {t["trial"] for t in json.loads((tmp_path / "a" / "pareto.json").read_text())["trials"]}
    assert before | by_b <= reported <= set(complete)
