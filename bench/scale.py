"""How far one PostgreSQL and one MLflow tracking server go: N simulated workers, no training.

    python bench/scale.py                      # N = 1, 4, 16, 64; plain RDB and the gRPC proxy
                                               # (make bench-scale): bench/results/scale.{json,md}
                                               # and the README's section
    python bench/scale.py --quick              # N = 1, 4, 5 trials each: bench/work/scale-quick/
    python bench/scale.py --render             # only rewrite scale.md and the README section

Runs in the multi-host bench of ``tests/hosts.py`` (network namespaces, as root): a ``db``
host runs PostgreSQL and the tracking server as the README's many-machine recipe sets them up
(``.pgpass``, MLflow's basic authentication, artifacts proxied by the server), and N worker
processes spread round-robin over a few worker hosts each loop as a real worker does
(``mnist_opt.search.objective.optimize``), with the training taken out:

* the gate and ask: :class:`mnist_opt.search.slots.TrialSlots` counts the study's trials and
  asks Optuna for the next under the study's lock (a PostgreSQL advisory lock), through
  :func:`mnist_opt.tracking.storage.make_storage`'s storage with its heartbeat, inside
  ``study.optimize`` (which fails stale trials and starts the heartbeat before each trial);
* five ``suggest_*`` calls, a nested MLflow run (``create_run`` under the study's parent run,
  ``log_batch`` of the parameters), ``trial.set_user_attr("mlflow_run_id", …)``;
* 10 steps of ``trial.report`` + ``trial.should_prune`` (median pruner: it reads the study;
  its answer is ignored so that every trial does the same work) and ``log_metric``;
* a small artifact (``log_text``, 1 kB through the server's artifact proxy), ``set_terminated``,
  and the tell.

Each worker runs 20 trials (at most 640 per N: 10 each at N = 64); a short warm-up run goes
first, unreported. Every call is timed; a trial's *coordination cost* is the sum of its calls
(there is nothing else in it); each worker's first trial (lazy imports, first connections) is
left out of the percentiles and shown apart. The workers start together once all have
imported and opened their stores. Per N: trials per second, p50/p95 of each call, the p95 of
the per-trial coordination cost, the peak of the database connections (``pg_stat_activity``'s
client backends every 0.25 s, by who holds them), errors, and whether the counts add up
(asked = told = finished = the study's target, one finished MLflow run per trial).

A *paced* run follows (``--paced-n``, 16 workers, 10 trials each): the same workers, but
each trial lasts about as long as a real trial of the shipped ``mlp_tpe`` here (from
``bench/results/speedup.json``; each trial's length drawn from half to one and a half times
it, as real trials differ, so that the workers do not move in step), a sleep before each
report standing for an epoch's training.
The sleep takes no core, so the servers see the load that 16 training workers on machines of
their own would make, and the per-trial coordination (the calls only) says what a worker
pays for it: the issue's target at 16 workers, measured rather than derived.

``--storages grpc`` puts Optuna's ``GrpcStorageProxy`` in front of the database
(``run_grpc_proxy_server`` on the db host with Optuna's cached RDB storage): the workers talk
gRPC to it, but the gate's lock still needs the database URL (``StudyLock``), so they still
connect to PostgreSQL for it; and the proxy has no heartbeat (``GrpcStorageProxy`` is not a
``BaseHeartbeat``), so a killed worker's trial stays RUNNING and keeps its slot for good.
(``grpcio``, which the proxy needs, comes with the pinned TensorFlow.)

All clients, both servers and the database share this machine's cores: the figures are a
lower bound of what one database and one tracking server on their own machine sustain.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mnist_opt, and the bench of tests/hosts.py

RESULTS = ROOT / "bench" / "results"
QUICK_OUT = ROOT / "bench" / "work" / "scale-quick"  # git-ignored
README_START, README_END = "<!-- scale:start -->", "<!-- scale:end -->"
NS, TRIALS_PER_WORKER, HOSTS = (1, 4, 16, 64), 20, 4
MAX_TRIALS = 640  # per N: fewer trials per worker where N x 20 would be more (N = 64: 10)
STEPS = 10  # intermediate values per trial
GRPC_PORT = 13000
WARM_UP_TRIALS = 3
PACED_N, PACED_TRIALS = 16, 10  # the paced run: the target's 16 workers, with trials' length
USER, PASSWORD = "mnist_opt", "bench-scale-password"  # the workers' MLflow user
CALLS = ("gate", "ask", "suggest", "report", "set_user_attr", "tell",
         "mlflow.create_run", "mlflow.log_params", "mlflow.log_metric", "mlflow.log_artifact",
         "mlflow.end_run")
MLFLOW_CALLS = CALLS[6:]
OPTUNA_CALLS = CALLS[:6]
SUPERUSER_RESERVED = 3  # PostgreSQL's default: connections only superusers get
COORDINATION_SHARE = 0.10  # "feeds" a worker while coordination is at most this share of its time


# -- a simulated worker (runs on a worker host) ------------------------------------------------

def _open_study(args: argparse.Namespace):
    import optuna

    from mnist_opt.tracking.storage import make_storage

    if args.grpc:
        host, port = args.grpc.rsplit(":", 1)
        storage = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        storage.wait_server_ready(timeout=120)
    else:
        storage = make_storage(args.db_url)
    return optuna.load_study(study_name=args.study, storage=storage,
                             sampler=optuna.samplers.RandomSampler(seed=args.index),
                             pruner=optuna.pruners.MedianPruner(n_startup_trials=5))


def worker(args: argparse.Namespace) -> int:
    """One simulated worker: ``args.trials`` trials as ``optimize`` runs them, every call
    timed; the figures go to ``args.out`` as JSON."""
    import warnings

    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_opt.search.slots import TrialSlots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    out = Path(args.out)
    calls: dict[str, list[float]] = {name: [] for name in CALLS}
    per_trial: list[float] = []
    errors: list[str] = []
    states: dict[str, int] = {}
    first: dict[str, int] = {}
    now = time.perf_counter
    mark = {"claim_end": 0.0, "objective_end": 0.0, "trial": 0.0, "slept": 0.0}
    asked = 0

    def timed(name: str, fn, *a, **kw):
        start = now()
        try:
            return fn(*a, **kw)
        finally:
            took = now() - start
            calls[name].append(took)
            mark["trial"] += took

    try:
        study = _open_study(args)
        client = MlflowClient()
        client.get_run(args.parent_run)  # signed in, the parent is there
        slots = TrialSlots(study, args.db_url, args.target)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on without this worker
        out.write_text(json.dumps({"index": args.index, "setup_error": f"{type(exc).__name__}: "
                                   f"{str(exc)[:500]}"}))
        return 1
    claim = slots.claim

    def timed_claim() -> bool:
        start = now()
        ok = claim()
        mark["claim_end"] = now()
        if ok:  # a claim that ends the loop is no trial's
            calls["gate"].append(mark["claim_end"] - start)
            mark["trial"] = mark["claim_end"] - start
        return ok

    slots.claim = timed_claim  # claim_next's callback calls self.claim too

    def objective(trial: optuna.Trial) -> float:
        nonlocal asked
        asked += 1
        took = now() - mark["claim_end"]  # optimize: stale check, ask, heartbeat start
        calls["ask"].append(took)
        mark["trial"] += took
        try:
            params = timed("suggest", lambda: {
                "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
                "units": trial.suggest_int("units", 16, 1024, log=True),
                "dropout": trial.suggest_float("dropout", 0.0, 0.5),
                "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
                "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd", "rmsprop"])})
            run = timed("mlflow.create_run", client.create_run, args.experiment,
                        run_name=f"trial-{trial.number}",
                        tags={"mlflow.parentRunId": args.parent_run, "mnist_opt.kind": "trial",
                              "trial_number": str(trial.number),
                              "optuna.study_name": args.study})
            run_id = run.info.run_id
            timed("set_user_attr", trial.set_user_attr, "mlflow_run_id", run_id)
            from mlflow.entities import Param
            timed("mlflow.log_params", client.log_batch, run_id,
                  params=[Param(k, str(v)) for k, v in params.items()])
            value = random.Random(trial.number).uniform(0.8, 0.9)
            # a paced trial's length: about a real one's, drawn from half to one and a half
            # times it (real trials differ), so that the workers do not report in step
            pace = args.pace * random.Random(f"{args.index}-{trial.number}").uniform(0.5, 1.5)
            for step in range(STEPS):
                time.sleep(pace / STEPS)  # a paced run: an epoch's training, on no core
                mark["slept"] += pace / STEPS
                value += 0.01 * (1 - value)
                timed("report", lambda: (trial.report(value, step), trial.should_prune()))
                timed("mlflow.log_metric", client.log_metric, run_id, "val_accuracy", value,
                      step=step)
            timed("mlflow.log_artifact", client.log_text, run_id,
                  json.dumps({"params": params, "pad": "x" * 900}), "trial.json")
            timed("mlflow.end_run", client.set_terminated, run_id, "FINISHED")
            return value
        except Exception as exc:
            errors.append(f"trial {trial.number}: {type(exc).__name__}: {str(exc)[:300]}")
            raise
        finally:
            mark["objective_end"] = now()

    def told(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        took = now() - mark["objective_end"]  # tell, heartbeat stop
        calls["tell"].append(took)
        per_trial.append(mark["trial"] + took)
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if len(per_trial) == 1:  # where the first trial's calls end (see summarise)
            first.update({name: len(v) for name, v in calls.items()})

    (out.with_suffix(".ready")).write_text(str(os.getpid()))
    go = Path(args.go)
    while not go.exists():
        time.sleep(0.01)
    started = time.time()
    try:
        if timed_claim():
            try:
                study.optimize(slots.gated(objective), n_trials=args.trials,
                               catch=(Exception,), gc_after_trial=False,
                               callbacks=[told, slots.claim_next(args.trials)])
            finally:
                slots.release()
    except Exception as exc:  # noqa: BLE001 - counted, not fatal to the bench
        errors.append(f"outside a trial: {type(exc).__name__}: {str(exc)[:300]}")
    out.write_text(json.dumps({
        "index": args.index, "host": socket.gethostname(), "pid": os.getpid(),
        "start": started, "end": time.time(), "asked": asked, "states": states,
        "calls": calls, "first": first, "per_trial": per_trial, "errors": errors,
        "slept_s": mark["slept"]}))
    return 0


def proxy_server(args: argparse.Namespace) -> int:
    """Optuna's gRPC storage proxy on the db host, in front of the cached RDB storage that
    Optuna's documentation recommends (no heartbeat: the proxy's clients send none)."""
    import warnings

    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.get_storage(optuna.storages.RDBStorage(args.db_url))
    print(f"gRPC proxy on {args.listen}, storage {args.db_url}", flush=True)
    host, port = args.listen.rsplit(":", 1)
    optuna.storages.run_grpc_proxy_server(storage, host=host, port=int(port))
    return 0


# -- the driver (the root namespace) ------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q / 100 * len(ranked)) - 1))]


class _ConnectionPoll(threading.Thread):
    """The peak count of client connections to the database server, from ``pg_stat_activity``
    every 0.25 s, by who holds them: the workers (from the worker hosts' addresses), the gRPC
    proxy (Optuna's database, from the db host itself), the tracking server (MLflow's
    database). The bench's own connections (from the gateway) are not counted; nor the
    proxy's when the storage measured is ``rdb`` (it sits idle then)."""

    KEYS = ("workers", "proxy", "mlflow", "total")

    def __init__(self, pg, worker_addrs: set[str], with_proxy: bool):
        super().__init__(daemon=True)
        import psycopg

        self.conn = psycopg.connect(host=pg.host.addr, port=pg.port, user=pg.USER,
                                    password=pg.password, dbname="optuna", autocommit=True)
        self.workers, self.with_proxy = worker_addrs, with_proxy
        self.peak = dict.fromkeys(self.KEYS, 0)
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def sample(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT datname, host(client_addr), count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' GROUP BY 1, 2").fetchall()
        counts = dict.fromkeys(self.KEYS, 0)
        for db, addr, n in rows:
            if db == "mlflow":
                counts["mlflow"] += n
            elif addr in self.workers:
                counts["workers"] += n
            elif db == "optuna" and addr in ("127.0.0.1", "::1") and self.with_proxy:
                counts["proxy"] += n
        counts["total"] = counts["workers"] + counts["proxy"] + counts["mlflow"]
        return counts

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            try:
                counts = self.sample()
            except Exception as exc:  # noqa: BLE001 - a missed sample, said in the output
                self.errors.append(str(exc)[:200])
                continue
            self.peak = {k: max(v, counts[k]) for k, v in self.peak.items()}

    def stop(self) -> dict:
        self.stopping.set()
        self.join(10)
        self.conn.close()
        return self.peak


def _env(extra: dict[str, str]) -> dict[str, str]:
    from hosts import BASE_PATH

    return {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "PYTHONPATH": str(ROOT),
            **extra}


def run_one(pg, server, hosts, storage: str, n: int, trials: int, timeout: float,
            proxy: str | None, pace: float = 0.0) -> dict:
    """N workers on one fresh study; their figures, summed up and checked. ``pace``: each
    trial sleeps that long in all (its epochs' training, taking no core)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_opt.tracking.storage import make_storage

    name = f"scale-{storage}-n{n}-{int(time.time())}"
    url = pg.url("optuna")
    opened = make_storage(url)
    optuna.create_study(study_name=name, storage=opened, direction="maximize")
    opened.engine.dispose()  # the bench's connections are not the workers'
    client = MlflowClient(server.uri)
    exp = client.create_experiment(name)
    parent = client.create_run(exp, run_name="scale", tags={"mnist_opt.kind": "study"}).info.run_id
    env = _env({"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": USER,
                "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    poll = _ConnectionPoll(pg, {h.addr for h in hosts}, proxy is not None)
    poll.start()
    procs, outs = [], []
    try:
        for i in range(n):
            host = hosts[i % len(hosts)]
            out = host.home / f"{name}-{i}.json"
            outs.append(out)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--db-url", url,
                   "--study", name, "--index", str(i), "--trials", str(trials),
                   "--target", str(n * trials), "--experiment", exp, "--parent-run", parent,
                   "--go", str(host.home / f"{name}.go"), "--out", str(out), "--pace", str(pace),
                   *(["--grpc", proxy] if proxy else [])]
            procs.append(host.popen(cmd, env=env, log=f"worker{i}"))
        end = time.monotonic() + timeout
        while not all(o.with_suffix(".ready").exists() or o.exists() for o in outs):
            # a worker that could not set up says so in its report (an error of the run);
            # one that died without a report is the bench's own failure
            dead = [p for p, o in zip(procs, outs) if p.poll() is not None and not o.exists()]
            if dead or time.monotonic() > end:
                from hosts import tail
                raise RuntimeError(f"{storage} N={n}: workers did not get ready:\n{tail(dead[0])}"
                                   if dead else f"{storage} N={n}: not ready in {timeout} s")
            time.sleep(0.1)
        go = time.time()
        for host in hosts:
            (host.home / f"{name}.go").write_text("go")
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # its report is missing then
                proc.wait(timeout=max(1, end - time.monotonic()))
    finally:
        peak = poll.stop()
        from hosts import stop_group
        for proc in procs:
            stop_group(proc, grace=5)
    reports = [json.loads(o.read_text()) if o.exists() else
               {"index": i, "setup_error": f"no report (timed out after {timeout:.0f} s or died)"}
               for i, o in enumerate(outs)]
    opened = make_storage(url)
    try:
        return {**summarise(storage, n, trials, go, reports, peak, poll.errors,
                            optuna.load_study(study_name=name, storage=opened), client, exp,
                            parent), "pace_s": pace}
    finally:
        opened.engine.dispose()


def summarise(storage: str, n: int, trials: int, go: float, reports: list[dict], peak: dict,
              poll_errors: list[str], study, client, exp: str, parent: str) -> dict:
    """One N's figures; the counts checked against the study and the tracking server."""
    import optuna

    ok = [r for r in reports if "setup_error" not in r]
    errors = [f"worker {r['index']}: {r['setup_error']}" for r in reports if r not in ok]
    errors += [e for r in ok for e in r["errors"]]
    # a worker's first trial pays its one-off start-up (lazy imports, first connections):
    # left out of the percentiles, its cost reported apart
    calls = {name: [v for r in ok for v in r["calls"][name][r["first"].get(name, 0):]]
             for name in CALLS}
    per_trial = [v for r in ok for v in r["per_trial"][1:]]
    first_trial = [r["per_trial"][0] for r in ok if r["per_trial"]]
    ask_with_gate = [a + g for a, g in zip(calls["ask"], calls["gate"])]
    told = sum(sum(r["states"].values()) for r in ok)
    wall = max((r["end"] for r in ok), default=go) - go
    trials_db = study.get_trials(deepcopy=False)
    by_state = {s.name: sum(t.state == s for t in trials_db) for s in optuna.trial.TrialState}
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
    return {
        "storage": storage, "n": n, "trials_per_worker": trials, "target": n * trials,
        "wall_s": wall, "trials_per_s": told / wall if wall > 0 else None,
        "asked": sum(r["asked"] for r in ok), "told": told,
        "study_states": {k: v for k, v in by_state.items() if v},
        "mlflow_runs": len(runs),
        "mlflow_runs_finished": sum(r.info.status == "FINISHED" for r in runs),
        "errors": len(errors), "error_samples": errors[:5],
        "slept_s": sum(r.get("slept_s", 0.0) for r in ok),
        "latency_s": {name: {"n": len(v), "p50": _percentile(v, 50), "p95": _percentile(v, 95)}
                      for name, v in calls.items()},
        "ask_with_gate_s": {"p50": _percentile(ask_with_gate, 50),
                            "p95": _percentile(ask_with_gate, 95)},
        "coordination_per_trial_s": {"p50": _percentile(per_trial, 50),
                                     "p95": _percentile(per_trial, 95),
                                     "mean": statistics.fmean(per_trial) if per_trial else None},
        "first_trial_s": {"p50": _percentile(first_trial, 50),
                          "max": max(first_trial, default=None)},
        "peak_db_connections": peak, "connection_poll_errors": len(poll_errors)}


def trial_seconds() -> dict:
    """A real trial's worker time, from the committed ``make bench-speedup`` run (the shipped
    mlp_tpe study on the full data): worker-seconds per trial, the shorter of its 1-worker and
    every-core settings (shorter trials make coordination weigh more)."""
    path = RESULTS / "speedup.json"
    out = json.loads(path.read_text())
    per = {}
    for label, s in out["settings"].items():
        workers = int(label.split()[0])
        per[label] = s["wall_s"]["median"] * workers / s["trials"]["median"]
    label = min(per, key=per.get)
    return {"seconds": per[label], "setting": label, "source": f"bench/results/{path.name}",
            "measured": out["started"], "per_setting": per}


def run(args: argparse.Namespace) -> dict:
    import importlib.metadata
    import warnings

    import mlflow  # noqa: F401 - before the bench: a broken install fails here, not in a host
    import optuna
    from mlflow.tracking import MlflowClient

    from hosts import SERVER_SETTINGS, Bench, MlflowServer, Postgres
    from mnist_opt.reporting.machine import code_version, describe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
    results, paced = [], []
    with Bench(readonly=[ROOT, sys.prefix]) as bench:
        db = bench.host("db")
        pg = Postgres(db).start()
        server = MlflowServer(db, pg, workers=args.mlflow_workers).start()
        server.add_user(USER, PASSWORD)
        os.environ.update({"PGPASSFILE": str(pg.pgpass(bench.base / "driver.pgpass")),
                           "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        MlflowClient(server.uri).search_experiments(max_results=1)
        hosts = [bench.host(f"w{i + 1}") for i in range(args.hosts)]
        for host in hosts:
            pg.pgpass(host.home / ".pgpass")
        proxy = None
        if "grpc" in args.storages:
            proxy = f"{db.addr}:{GRPC_PORT}"
            proc = db.popen([sys.executable, str(Path(__file__).resolve()), "--proxy-server",
                             "--db-url", f"postgresql://{pg.USER}@localhost:{pg.port}/optuna",
                             "--listen", proxy], env=_env({}), log="grpc-proxy")
            with warnings.catch_warnings():  # experimental since 4.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ready = optuna.storages.GrpcStorageProxy(host=db.addr, port=GRPC_PORT)
            try:
                ready.wait_server_ready(timeout=120)
            except Exception as exc:
                from hosts import tail
                raise RuntimeError(f"the gRPC proxy did not start: {exc}\n{tail(proc)}") from exc
            ready.close()
        server_version = pg._pg("postgres", "--version").strip()
        print(f"bench up in {time.monotonic() - clock:.0f} s: PostgreSQL and the tracking server "
              f"on {db.addr}, {len(hosts)} worker hosts", flush=True)
        # the first requests to each tracking server process and a fresh database pay one-off
        # costs (lazy imports, caches): a short run, not reported, takes them first
        if args.warm_up:
            clock = time.monotonic()
            warm = run_one(pg, server, hosts, "rdb", len(hosts), args.warm_up, args.timeout, None)
            warm["bench_s"] = time.monotonic() - clock
            print(f"warm-up ({len(hosts)} workers x {args.warm_up} trials, not reported): "
                  f"{line(warm)}", flush=True)
        for n in args.ns:
            for storage in args.storages:
                each = min(args.trials_per_worker, max(2, args.max_trials // n))
                print(f"{storage}, N={n}: {n} workers x {each} trials", flush=True)
                clock = time.monotonic()
                one = run_one(pg, server, hosts, storage, n, each,
                              args.timeout, proxy if storage == "grpc" else None)
                one["bench_s"] = time.monotonic() - clock  # processes' start-up included
                results.append(one)
                print("  " + line(one), flush=True)
        trial = trial_seconds()
        pace = args.paced_seconds or trial["seconds"]
        for storage in args.storages if args.paced_n else ():
            n = args.paced_n
            print(f"{storage}, N={n} paced: {n} workers x {args.paced_trials} trials of "
                  f"{pace:.1f} s", flush=True)
            clock = time.monotonic()
            one = run_one(pg, server, hosts, storage, n, args.paced_trials, args.timeout,
                          proxy if storage == "grpc" else None, pace=pace)
            one["bench_s"] = time.monotonic() - clock
            paced.append(one)
            print("  " + line(one), flush=True)
    versions = {p: importlib.metadata.version(p) for p in
                ("optuna", "mlflow", "sqlalchemy", "psycopg", "grpcio", "uvicorn", "uvloop")}
    return {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": describe(()).rstrip("; "), "code": code_version(), "versions": versions,
            "postgresql": server_version, "mlflow_server_workers": args.mlflow_workers,
            "max_connections": SERVER_SETTINGS["max_connections"],
            "worker_hosts": args.hosts, "steps": STEPS, "trials_per_worker": args.trials_per_worker,
            "max_trials": args.max_trials, "warm_up_trials": args.warm_up,
            "command": f"python bench/scale.py {shlex.join(args.argv)}".strip(),
            "trial_time": trial, "results": results, "paced": paced}


def line(r: dict) -> str:
    c, lat = r["coordination_per_trial_s"], r["latency_s"]
    return (f"{r['told']}/{r['target']} trials in {r['wall_s']:.1f} s ({r['bench_s']:.0f} s with "
            f"start-up) = {r['trials_per_s']:.1f}/s; "
            f"ask+gate p95 {_ms(r['ask_with_gate_s']['p95'])}, tell p95 {_ms(lat['tell']['p95'])}, "
            f"coordination/trial p95 {_ms(c['p95'])}; peak connections "
            f"{r['peak_db_connections']['total']}; errors {r['errors']}; counts "
            f"{'add up' if counts_add_up(r) else 'DO NOT add up'}")


def counts_add_up(r: dict) -> bool:
    """Asked = told = finished = the target, one finished MLflow run per trial, no error."""
    finished = r["study_states"].get("COMPLETE", 0) + r["study_states"].get("PRUNED", 0)
    return (r["asked"] == r["told"] == finished == r["target"] == sum(r["study_states"].values())
            == r["mlflow_runs"] == r["mlflow_runs_finished"] and r["errors"] == 0)


# -- rendering: scale.md and the README section, from scale.json only ---------------------------

def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}" if seconds >= 0.01 else \
        f"{seconds * 1000:.1f}"


def fed(out: dict) -> dict:
    """How many training workers one database + one tracking server feed before coordination
    takes more than :data:`COORDINATION_SHARE` of a worker's time, per storage.

    A real worker spends T (training) + c (coordination) per trial. At simulated load N the
    servers handled X(N) trials/s with per-trial coordination c(N) at p95; real workers of
    trial time T at that load number X(N) * (T + c(N)). Fed: the largest such count among the
    N where c(N) / (T + c(N)) <= the share (measured loads only: no extrapolation)."""
    t = out["trial_time"]["seconds"]
    found = {}
    for storage in dict.fromkeys(r["storage"] for r in out["results"]):
        best = None
        for r in (r for r in out["results"] if r["storage"] == storage):
            c = r["coordination_per_trial_s"]["p95"]
            if c is None or r["errors"] or c / (t + c) > COORDINATION_SHARE:
                continue
            workers = r["trials_per_s"] * (t + c)
            if best is None or workers > best["workers"]:
                best = {"workers": workers, "at_n": r["n"], "p95_s": c, "share": c / (t + c)}
        if best is None:  # over the share at every load: say how far over at the lightest
            r = min((r for r in out["results"] if r["storage"] == storage), key=lambda r: r["n"])
            c = r["coordination_per_trial_s"]["p95"] or math.inf
            best = {"workers": None, "at_n": r["n"], "p95_s": c, "share": c / (t + c)}
        found[storage] = best
    return found


def min_trial_times(out: dict) -> list[str]:
    """Per storage and N: the shortest trial for which coordination (p95) stays within the
    share, and how many workers of that trial time the servers feed at that load."""
    k = (1 - COORDINATION_SHARE) / COORDINATION_SHARE  # c / (T + c) <= s  <=>  T >= k c
    found = []
    for r in out["results"]:
        c = r["coordination_per_trial_s"]["p95"]
        if c is None or r["errors"]:
            continue
        found.append(f"{r['storage']} N = {r['n']}: trials of ≥ {k * c:.0f} s, "
                     f"{r['trials_per_s'] * (k + 1) * c:.0f} workers")
    return found


def saturation(rows: list[dict]) -> str:
    """Where trials per second stop growing with N (less than 1.2x for the next N)."""
    rows = sorted(rows, key=lambda r: r["n"])
    for a, b in zip(rows, rows[1:]):
        if b["errors"]:
            return f"errors from N = {b['n']}"
        if b["trials_per_s"] < 1.2 * a["trials_per_s"]:
            return (f"saturates by N = {b['n']} ({b['trials_per_s']:.1f} trials/s against "
                    f"{a['trials_per_s']:.1f} at N = {a['n']})")
    return f"not saturated up to N = {rows[-1]['n']}" if rows else "no runs"


NAMES = {"rdb": "RDB", "grpc": "gRPC proxy"}


def paced_table(out: dict) -> str:
    """The paced runs: N workers whose trials last a real trial's time (a sleep for the
    training), so that the servers see the load N training workers make."""
    rows = ["| storage | N | trial length s (mean) | trials | trials / s | ask incl. gate p50 / p95 ms "
            "| report p50 / p95 ms | log_metric p50 / p95 ms | coordination per trial p50 / "
            "p95 ms | coordination p95 ÷ (trial + it) | errors | counts add up |",
            "|---" * 12 + "|"]
    for r in out.get("paced", []):
        lat, c, pace = r["latency_s"], r["coordination_per_trial_s"], r["pace_s"]
        metric = lat["mlflow.log_metric"]
        rows.append(
            f"| {NAMES.get(r['storage'], r['storage'])} | {r['n']} | {pace:.1f} | {r['told']} | "
            f"{r['trials_per_s']:.2f} | {_ms(r['ask_with_gate_s']['p50'])} / "
            f"{_ms(r['ask_with_gate_s']['p95'])} | {_ms(lat['report']['p50'])} / "
            f"{_ms(lat['report']['p95'])} | {_ms(metric['p50'])} / {_ms(metric['p95'])} | "
            f"{_ms(c['p50'])} / {_ms(c['p95'])} | {_pct(_share(r))} | "
            f"{r['errors']} | {'yes' if counts_add_up(r) else 'no'} |")
    return "\n".join(rows)


def tables(out: dict) -> str:
    head = ["| storage | N | trials | trials / s | ask incl. gate p50 / p95 ms | report p50 / p95 ms "
            "| tell p50 / p95 ms | coordination per trial p95 ms | a worker's first trial p50 ms "
            "| peak DB connections "
            "(workers + proxy + tracking server) | errors | counts add up |", "|---" * 12 + "|"]
    for r in out["results"]:
        lat, peak = r["latency_s"], r["peak_db_connections"]
        head.append(
            f"| {NAMES.get(r['storage'], r['storage'])} | {r['n']} | {r['told']} | "
            f"{r['trials_per_s']:.1f} | {_ms(r['ask_with_gate_s']['p50'])} / "
            f"{_ms(r['ask_with_gate_s']['p95'])} | {_ms(lat['report']['p50'])} / "
            f"{_ms(lat['report']['p95'])} | {_ms(lat['tell']['p50'])} / {_ms(lat['tell']['p95'])} "
            f"| {_ms(r['coordination_per_trial_s']['p95'])} | {_ms(r['first_trial_s']['p50'])} "
            f"| {peak['total']} ({peak['workers']} + "
            f"{peak['proxy']} + {peak['mlflow']}) | {r['errors']} | "
            f"{'yes' if counts_add_up(r) else 'no'} |")
    calls = ["| storage | N | " + " | ".join(c.replace("mlflow.", "") for c in MLFLOW_CALLS)
             + " | gate | ask | suggest (5) | set_user_attr |",
             "|---|---|" + "---|" * (len(MLFLOW_CALLS) + 4)]
    for r in out["results"]:
        lat = r["latency_s"]
        cells = [f"{_ms(lat[c]['p50'])} / {_ms(lat[c]['p95'])}"
                 for c in (*MLFLOW_CALLS, "gate", "ask", "suggest", "set_user_attr")]
        calls.append(f"| {NAMES.get(r['storage'], r['storage'])} | {r['n']} | "
                     + " | ".join(cells) + " |")
    paced = "" if not out.get("paced") else (
        "\n\nPaced: the same workers, but each trial lasts about as long as a real one (drawn "
        "from half to one and a half times it; a sleep in "
        f"{STEPS} equal parts, one before each report, stands for its epochs: it takes no "
        "core, so the N workers make the load of N training workers on machines of their own; "
        "coordination counts the calls only):\n\n" + paced_table(out))
    return "\n".join(head) + "\n\nEach call's p50 / p95 in ms (MLflow calls first; `log_metric` "\
        f"{STEPS} times per trial, `report` = `trial.report` + `trial.should_prune`, {STEPS} " \
        "times):\n\n" + "\n".join(calls) + paced


def _max_connections(out: dict) -> int:
    """The server's ``max_connections`` in a run (runs before it was recorded: the default)."""
    return out.get("max_connections", 100)


def connections(out: dict) -> str:
    """Database connections per worker at each N, and whether the server was full."""
    most = _max_connections(out)
    usable = most - SUPERUSER_RESERVED - 1  # 1: the bench's own poll
    per, full = [], []
    for r in out["results"]:
        peak = r["peak_db_connections"]
        per.append(f"{r['storage']} N = {r['n']}: {peak['workers'] / r['n']:.1f}")
        refused = any(word in e for e in r.get("error_samples", ())
                      for word in ("connection slots", "too many clients"))
        if peak["total"] >= usable or refused:  # samples every 0.25 s may miss the peak
            full.append(f"{r['storage']} N = {r['n']}")
    state = (f"full at {', '.join(full)}: workers waited there for a free connection (opening "
             "the storage and every call retry PostgreSQL's refusal for up to "
             "`MNIST_OPT_DB_RETRY`, README \"Many machines\"), and those whose wait ran out "
             "are the errors above" if full else "never full")
    return (f"- Database connections per worker (the workers' peak ÷ N): {'; '.join(per)}. A "
            "worker keeps its storage's pooled connections (its own and its heartbeat "
            "thread's) and takes one more while it waits for or holds the study's lock; the "
            "tracking server up to 15 per process (SQLAlchemy's pool). With them, "
            f"`max_connections` = {most} ({most - SUPERUSER_RESERVED} for other roles than "
            f"superusers; PostgreSQL's default is 100, the recipe sets 300) was {state}.")


def _share(r: dict) -> float | None:
    """A paced run's coordination p95 as a share of a worker's time per trial (None: no
    trial measured, e.g. one trial per worker, which the percentiles leave out)."""
    c = r["coordination_per_trial_s"]["p95"]
    return None if c is None else c / (r["pace_s"] + c)


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{share:.2%}" if abs(share - COORDINATION_SHARE) < 0.005 \
        else f"{share:.1%}"  # one more decimal by the line: 10.0 % may be over it


# how often a simulated trial makes each call (CALLS; "suggest" times the 5 suggestions at once)
PER_TRIAL = {"report": STEPS, "mlflow.log_metric": STEPS}


def floor(out: dict) -> list[str]:
    """One worker alone (N = 1): what the calls the simulated trial must make cost by
    themselves, summed per trial, Optuna's apart from MLflow's: the coordination cost that no
    server capacity removes on this machine."""
    def total(lat: dict, names, q: str) -> float:
        return sum(lat[n][q] * PER_TRIAL.get(n, 1) for n in names if lat[n][q] is not None)

    def both(lat: dict, names) -> str:
        return f"{_ms(total(lat, names, 'p50'))} / {_ms(total(lat, names, 'p95'))} ms"

    lines = [f"{r['storage']}: Optuna's calls (gate, ask, the suggestions, set_user_attr, "
             f"{STEPS} reports with should_prune, tell) {both(r['latency_s'], OPTUNA_CALLS)}, "
             f"MLflow's {both(r['latency_s'], MLFLOW_CALLS)} (of which the {STEPS} log_metric "
             f"{both(r['latency_s'], ['mlflow.log_metric'])})"
             for r in out["results"] if r["n"] == 1]
    if not lines:
        return []
    return ["- One worker alone (N = 1, nothing else running), each call's p50 / p95 summed over "
            f"a trial: {'; '.join(lines)}. Optuna's calls are synchronous by nature (a report "
            "decides whether to prune; ask and tell go through the study's storage): even with "
            "every MLflow call taken off the worker's path, they alone cost about the 200 ms "
            "target on this CPU for one worker, before 16 workers' clients share its 2 cores "
            "with both servers."]


def conclusions(out: dict) -> str:
    t = out["trial_time"]
    by = {}
    for r in out["results"]:
        by.setdefault(r["storage"], []).append(r)
    parts = []
    for storage, rows in by.items():
        label = {"rdb": "Plain RDB storage", "grpc": "Through the gRPC proxy"}.get(storage, storage)
        best = max(r["trials_per_s"] for r in rows)
        most = max(r["peak_db_connections"]["total"] for r in rows)
        parts.append(f"- {label}: {saturation(rows)}; peak {best:.1f} trials/s; at most {most} "
                     f"database connections of `max_connections` = {_max_connections(out)}; "
                     f"{sum(r['errors'] for r in rows)} errors.")
    targets = []
    for storage, rows in by.items():
        big = max(rows, key=lambda r: r["n"])
        at16 = next((r for r in rows if r["n"] == 16), None)
        targets.append(
            f"{storage}: {big['n']} concurrent workers with "
            + ("no errors" if big["errors"] == 0 and counts_add_up(big) else "errors or lost counts")
            + ("" if at16 is None else f", coordination p95 at 16 workers "
               f"{_ms(at16['coordination_per_trial_s']['p95'])} ms "
               f"({'within' if at16['coordination_per_trial_s']['p95'] <= 0.2 else 'over'} "
               "200 ms)"))
    feeds = []
    for storage, f in fed(out).items():
        feeds.append(f"{storage}: none — at N = {f['at_n']} coordination p95 is already "
                     f"{_ms(f['p95_s'])} ms = {f['share']:.1%} of a trial, the calls' own latency "
                     "rather than the servers' load" if f["workers"] is None else
                     f"{storage}: about **{f['workers']:.0f} training workers** (the load of N = "
                     f"{f['at_n']} simulated ones, coordination p95 {_ms(f['p95_s'])} ms = "
                     f"{f['share']:.1%} of a trial)")
    paced = [f"{r['storage']} {_ms(r['coordination_per_trial_s']['p95'])} ms "
             f"({'within' if r['coordination_per_trial_s']['p95'] <= 0.2 else 'over'} 200 ms; "
             f"{_pct(_share(r))} of a trial: these {r['n']} workers "
             f"{'are' if _share(r) <= COORDINATION_SHARE and not r['errors'] else 'are not'} fed "
             f"within {COORDINATION_SHARE:.0%})" for r in out.get("paced", [])
             if _share(r) is not None]
    return "\n".join([
        *parts,
        f"- Targets (≥ 64 workers without errors; coordination ≤ 200 ms per trial at p95 at 16 "
        f"workers), with no pause between trials: {'; '.join(targets)}."
        + (f" Paced, {out['paced'][0]['n']} workers whose trials last "
           f"{out['paced'][0]['pace_s']:.1f} s on average (their clients still on this "
           f"machine's cores): coordination p95 {'; '.join(paced)}."
           if paced else ""),
        f"- A real trial here takes {t['seconds']:.1f} worker-seconds ({t['source']}, "
        f"{t['setting']}, measured {t['measured']}: the shipped `mlp_tpe` study on the full data, "
        f"the shorter of its settings). Training workers one database + one tracking server "
        f"feed while coordination stays within {COORDINATION_SHARE:.0%} of a worker's time "
        "(trials per second at a measured load × (trial time + coordination at p95); no "
        f"extrapolation beyond the largest N run): {'; '.join(feeds)}."
        + (" An estimate from the closed loop, which assumes the load's calls spread evenly; "
           "the paced run measures it, with the workers' own clients on the servers' cores too, "
           "and is the figure to go by." if out.get("paced") else ""),
        f"- For trials of other lengths, the shortest trial that keeps coordination within "
        f"{COORDINATION_SHARE:.0%}, and the workers the servers then feed, at each load measured: "
        f"{'; '.join(min_trial_times(out))}.",
        connections(out),
        *floor(out),
        "- A **lower bound**: the N client processes, PostgreSQL, the tracking server (and the "
        "proxy) all ran on this machine's cores, so past a few workers this measures the "
        "machine as much as the servers. Real training here is bounded at **2 workers** by the "
        "2 cores (`make bench-speedup`): the worker counts above are for workers on machines "
        "of their own, not for this one.",
        "- The gRPC proxy has no heartbeat of its own (`GrpcStorageProxy` is no "
        "`BaseHeartbeat`): a killed worker's trial is never failed as stale and keeps its slot "
        "in the gate for good; and the gate's lock (`StudyLock`) needs the database URL, so "
        "workers behind the proxy still need the database's password and open a connection per "
        "claim. It is not the default; it may become one for many workers only once the fault "
        "tests pass through it."])


def render(out: dict, path: Path, readme: bool) -> int:
    v = ", ".join(f"{k} {val}" for k, val in out["versions"].items())
    text = "\n".join([
        f"`{out['command']}`, {out['started']} to {out['finished']}, on {out['machine']}; "
        f"{out['postgresql']}; {v}; code {out['code']}. One PostgreSQL and one MLflow tracking "
        f"server ({out['mlflow_server_workers']} server processes"
        f"{' on uvloop' if 'uvloop' in out['versions'] else ''}, basic-auth, artifacts "
        f"proxied) on the `db` host of the namespaced bench; N simulated workers (no training) "
        f"round-robin over {out['worker_hosts']} worker hosts, each running "
        f"{out.get('trials_per_worker', '?')} trials (fewer where N × that would pass "
        f"{out.get('max_trials', '?')}) of one shared study through `TrialSlots` (gate + ask "
        "under the study's lock) and "
        f"`make_storage` (heartbeat on); per trial {STEPS} reports and metrics, 5 parameters, "
        "a nested MLflow run, a 1 kB artifact. Times are per call, from the workers' side; "
        "each worker's first trial (its one-off start-up) is left out of the percentiles and "
        + (f"shown apart; a short warm-up run ({out['warm_up_trials']} trials per worker host, "
           "not reported) goes first." if out.get("warm_up_trials") else "shown apart."), "",
        tables(out), "", conclusions(out), ""])
    (path / "scale.md").write_text("# How far one database and one tracking server go\n\n"
                                   "Generated by `bench/scale.py` from `scale.json`.\n\n" + text)
    print(text)
    if readme:
        from mnist_opt.textblocks import replace_between

        replace_between(ROOT / "README.md", README_START, README_END, "\n" + text)
        print("updated README.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default=None, help="worker counts, comma-separated (1,4,16,64)")
    parser.add_argument("--trials-per-worker", type=int, default=None,
                        help=f"trials each worker runs (default {TRIALS_PER_WORKER})")
    parser.add_argument("--storages", default="rdb,grpc", help="rdb, grpc or both (default)")
    parser.add_argument("--max-trials", type=int, default=MAX_TRIALS,
                        help=f"at most this many trials per N (default {MAX_TRIALS}): fewer per "
                        "worker at large N")
    parser.add_argument("--hosts", type=int, default=HOSTS, help=f"worker hosts (default {HOSTS})")
    parser.add_argument("--mlflow-workers", type=int, default=4,
                        help="tracking server processes (default 4, MLflow's and the recipe's)")
    parser.add_argument("--warm-up", type=int, default=WARM_UP_TRIALS,
                        help=f"trials per worker host of the unreported warm-up run (default "
                        f"{WARM_UP_TRIALS}; 0: none)")
    parser.add_argument("--paced-n", type=int, default=None,
                        help=f"workers of the paced run (default {PACED_N}, --quick 4; 0: none): "
                        "trials that last as long as a real one, a sleep standing for the training")
    parser.add_argument("--paced-trials", type=int, default=None,
                        help=f"trials per worker of the paced run (default {PACED_TRIALS}, --quick 2)")
    parser.add_argument("--paced-seconds", type=float, default=None,
                        help="a paced trial's length (default: a real trial's, from "
                        "bench/results/speedup.json)")
    parser.add_argument("--timeout", type=float, default=3600, help="per N and storage, seconds")
    parser.add_argument("--quick", action="store_true",
                        help=f"N = 1, 4, 5 trials each, into {QUICK_OUT.relative_to(ROOT)}/")
    parser.add_argument("--out", type=Path, default=None, help="folder for scale.json and scale.md "
                        "(default bench/results; --quick: bench/work/scale-quick)")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--render", action="store_true",
                        help="only write scale.md and the README section from scale.json")
    # the processes the bench starts on its hosts
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--proxy-server", action="store_true", help=argparse.SUPPRESS)
    for name in ("--db-url", "--grpc", "--study", "--experiment", "--parent-run", "--go",
                 "--listen"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--index", "--trials", "--target"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pace", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # --out: its JSON file
        return worker(args)
    if args.proxy_server:
        return proxy_server(args)
    args.argv = argv
    ns = args.ns or ("1,4" if args.quick else ",".join(map(str, NS)))
    args.ns = [int(n) for n in ns.split(",")]
    args.trials_per_worker = args.trials_per_worker or (5 if args.quick else TRIALS_PER_WORKER)
    if args.paced_n is None:
        args.paced_n = 4 if args.quick else PACED_N
    args.paced_trials = args.paced_trials or (2 if args.quick else PACED_TRIALS)
    args.storages = [s for s in args.storages.split(",") if s]
    if set(args.storages) - {"rdb", "grpc"}:
        parser.error("--storages: rdb, grpc")
    out_dir = args.out or (QUICK_OUT if args.quick else RESULTS)
    readme = not args.no_readme and out_dir.resolve() == RESULTS.resolve()
    if args.render:
        if not (out_dir / "scale.json").exists():
            print(f"no {out_dir / 'scale.json'}: run `make bench-scale` first", file=sys.stderr)
            return 2
        return render(json.loads((out_dir / "scale.json").read_text()), out_dir, readme)
    from hosts import namespaces_work

    if not namespaces_work():
        print("bench/scale.py needs network namespaces (root, `unshare -n true`)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the bench is torn down on the way out
    out = run(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(out, indent=1) + "\n")
    return render(out, out_dir, readme)


if __name__ == "__main__":
    sys.exit(main())
