"""Run a finsynth deployment end to end on a local Prefect server, then stop what was started.

    python -m flows.deploy --profile demo               # the README's main command runs this
    python -m flows.deploy --deployment augment-only     # rerun augmentation alone

Steps: start ``prefect server`` on 127.0.0.1 (SQLite under ``--home``), wait until healthy, create
the ``process`` work pool, ``prefect deploy --all`` from ``prefect.yaml``, start a worker, run the
deployment and wait for it, print its final state and where the outputs are, then stop the worker
(SIGINT twice: it ignores SIGTERM) and the server. Exit status 0 only if the flow run completed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from datagen.config import PROJECT_ROOT

POOL = "finsynth-process"
FLOW_NAME = "finsynth-pipeline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """Environment for a self-contained local Prefect: its own home, database and result storage."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "FINSYNTH_PROJECT_DIR": str(PROJECT_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def stop(proc: subprocess.Popen, name: str, grace_s: float = 15.0) -> None:
    """SIGINT twice (a Prefect worker ignores SIGTERM), then SIGKILL."""
    if proc.poll() is not None:
        return
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s / 2)
            return
        except subprocess.TimeoutExpired:
            continue
    print(f"[deploy] {name} did not stop on SIGINT; killing it", flush=True)
    proc.kill()
    proc.wait()


@contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path, name: str):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    try:
        yield proc
    finally:
        stop(proc, name)


def wait_healthy(api_url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s:.0f} s; see {log}")


def run_cli(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[2:])} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


@contextmanager
def local_prefect(home: Path, port: int = 0):
    """A local server + process pool + deployments from prefect.yaml + a worker; yields the env."""
    port = port or free_port()
    env = prefect_env(home, port)
    api_url = env["PREFECT_API_URL"]
    logs = home / "logs"
    with ExitStack() as stack:
        server = stack.enter_context(background(
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), env,
            logs / "server.log", "server"))
        healthy_s = wait_healthy(api_url, server, logs / "server.log")
        print(f"[deploy] server healthy at {api_url} in {healthy_s:.1f} s", flush=True)
        r = subprocess.run(_prefect("work-pool", "create", POOL, "--type", "process"), env=env,
                           cwd=PROJECT_ROOT, capture_output=True, text=True)
        if r.returncode != 0 and "already exists" not in (r.stdout + r.stderr):
            raise RuntimeError(f"work-pool create failed: {r.stdout[-1000:]} {r.stderr[-1000:]}")
        run_cli(_prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(PROJECT_ROOT / "prefect.yaml")),
                env)
        print(f"[deploy] deployed prefect.yaml to pool {POOL}", flush=True)
        stack.enter_context(background(_prefect("worker", "start", "--pool", POOL, "--type", "process"),
                                       env, logs / "worker.log", "worker"))
        print("[deploy] worker started", flush=True)
        yield env


def deploy_and_run(*, deployment: str, parameters: dict, home: Path, port: int = 0,
                   timeout_s: float = 3600, on_line: Callable[[dict], None] | None = None) -> dict:
    """Start server and worker, deploy, run ``deployment`` with ``parameters`` (its stage and progress
    lines to ``on_line`` while it runs); return a summary."""
    t0 = time.monotonic()
    with local_prefect(home, port) as env:
        name = f"{FLOW_NAME}/{deployment}"
        print(f"[deploy] running {name} with {parameters}", flush=True)
        summary = {"deployment": name, "api_url": env["PREFECT_API_URL"],
                   **run_deployment_in(env, name, parameters, timeout_s, on_line)}
    summary["total_s"] = round(time.monotonic() - t0, 1)
    return summary


def run_deployment_in(env: dict[str, str], name: str, parameters: dict, timeout_s: float,
                      on_line: Callable[[dict], None] | None = None) -> dict:
    """Run in a child process (``python -m flows.deploy --child``) so this process's Prefect settings
    stay untouched. While the flow run runs, the child reads its stage and progress lines from Prefect's
    logs API (:func:`flows.progress.follow`) and prints each as one ``@@LINE@@`` JSON line, which goes to
    ``on_line`` as it arrives (``received``: this machine's clock; ``timestamp``: the record's); at the end
    it prints one ``@@RESULT@@`` JSON line. The summary lists the lines under ``progress``; the child's
    stderr goes to ``<PREFECT_HOME>/logs/run.log``."""
    log = Path(env.get("PREFECT_HOME", PROJECT_ROOT / ".prefect")) / "logs" / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []
    result = None
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--child", name, json.dumps(parameters),
                                 str(timeout_s)], env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.startswith(LINE_MARK):
                rec = json.loads(raw[len(LINE_MARK):])
                rec["received"] = time.time()
                lines.append(rec)
                if on_line is not None:
                    on_line(rec)
            elif raw.startswith(RESULT_MARK):
                result = json.loads(raw[len(RESULT_MARK):])
        proc.wait()
    if result is None:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"run_deployment failed ({proc.returncode}); {log} ends with: {tail}")
    return {**result, "progress": lines}


def packaged_models(cfg) -> list[str]:
    """The ``packaged:`` models a run of ``cfg`` loads with transformers: the target model and the local
    providers' (whose default is the packaged Gemma)."""
    from datagen.llm.local import DEFAULT_MODEL_PATH
    from lm.packaged import PACKAGED_PREFIX

    names = [cfg.model.name_or_path] + [p.model_path or DEFAULT_MODEL_PATH for p in cfg.llm.providers.values()
                                        if p.kind == "local"]
    return sorted({n for n in names if n.startswith(PACKAGED_PREFIX)})


def warm_models(profile: str, root: str | None, overrides: list[str], terminal) -> threading.Thread | None:
    """Convert the run's packaged models (a minute, once per machine: :func:`lm.packaged.gemma_path`) in a
    thread of this process while the server starts, the deployment registers and the worker picks the run
    up, instead of inside the first stage that needs them; that stage waits on the conversion's file lock
    if it gets there first. Nothing to do when they are converted already. A failure here is left to the
    stage, which reports it the usual way."""
    import logging

    from datagen.config import load_config
    from flows.progress import TerminalHandler
    from lm.packaged import converted, resolve_model_path

    try:
        todo = [n for n in packaged_models(load_config(None, profile=profile, overrides=overrides, root=root))
                if not converted(n)]
    except Exception:  # a bad config or profile: the flow run says what is wrong with it
        return None
    if not todo:
        return None

    def work() -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its warnings would land between the run's lines in this terminal
        t0 = time.monotonic()
        models = logging.getLogger("finsynth.models")
        handler = TerminalHandler(terminal)
        models.addHandler(handler)
        models.setLevel(logging.INFO)
        try:
            for name in todo:
                resolve_model_path(name)
            terminal.line(f"[models] {', '.join(todo)} ready in {time.monotonic() - t0:.0f} s")
        except Exception as e:  # the stage that loads the model meets the same fault and reports it
            terminal.line(f"[models] preparing {', '.join(todo)} failed ({type(e).__name__}); the run reports it")
        finally:
            models.removeHandler(handler)
            from lm.causal_lm import release_memory

            release_memory()  # the dequantized weights were garbage: give the pages back

    thread = threading.Thread(target=work, name="finsynth-warm-models", daemon=True)
    thread.start()
    return thread


RESULT_MARK = "@@RESULT@@"
LINE_MARK = "@@LINE@@"


def _child_run(name: str, parameters: str, timeout_s: str) -> int:
    """The child side of :func:`run_deployment_in`: start the deployment's run, print its lines while it
    runs, then its summary."""
    from prefect.deployments import run_deployment

    from flows.progress import follow

    def line(lg) -> None:
        print(LINE_MARK + json.dumps({"name": lg.name, "level": lg.level, "message": lg.message,
                                      "timestamp": lg.timestamp.timestamp()}), flush=True)

    fr = run_deployment(name, parameters=json.loads(parameters), timeout=0)  # created: now follow it
    fr = follow(fr.id, line, timeout_s=float(timeout_s))
    res = None
    if fr.state and fr.state.is_completed():
        try:
            res = fr.state.result(raise_on_failure=False)
        except Exception as e:
            res = {"unavailable": str(e)}
    st = fr.state
    print(RESULT_MARK + json.dumps({"flow_run_id": str(fr.id), "flow_run_name": fr.name,
                                    "state": st.type.value if st else None, "state_name": st.name if st else None,
                                    "message": st.message if st else None, "result": res,
                                    "start_time": fr.start_time.timestamp() if fr.start_time else None,
                                    "end_time": fr.end_time.timestamp() if fr.end_time else None}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_run(*argv[1:4])
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--deployment", default="pipeline", choices=["pipeline", "augment-only", "evaluate-only"])
    p.add_argument("--profile", default="demo")
    p.add_argument("--root", default=None, help="project root for data/ (default: the repo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--home", type=Path, default=PROJECT_ROOT / ".prefect", help="PREFECT_HOME (server DB, logs)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    params = {"profile": args.profile}
    if args.root:
        params["root"] = str(Path(args.root).resolve())
    if args.overrides:
        params["overrides"] = args.overrides
    from datagen.progress import PROGRESS_LOGGER
    from flows.progress import Terminal

    terminal = Terminal(sys.stdout)
    home = args.home.resolve()
    warm_models(args.profile, params.get("root"), args.overrides, terminal)
    try:
        summary = deploy_and_run(deployment=args.deployment, parameters=params, home=home,
                                 port=args.port, timeout_s=args.timeout,
                                 on_line=lambda r: terminal.line(r["message"], progress=r["name"] == PROGRESS_LOGGER,
                                                                 when=r["timestamp"]))
    except (RuntimeError, OSError) as e:
        terminal.end()
        print(f"finsynth deploy: error: {e}", file=sys.stderr)
        return 2
    terminal.end()
    print(outcome(summary, home), flush=True)
    return 0 if summary.get("state") == "COMPLETED" else 1


def outcome(summary: dict, home: Path) -> str:
    """What the main command prints once the run ended: its state, the score tables and a few test
    questions with base and tuned answers, and where everything is; the summary itself goes to
    ``<home>/last-run.json``."""
    from datagen.progress import seconds

    saved = home / "last-run.json"
    saved.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    res = summary.get("result") if isinstance(summary.get("result"), dict) else {}
    took = summary.get("total_s")
    out = ["", f"flow run {summary.get('flow_run_name')}: {summary.get('state_name')}"
           + (f" after {seconds(took)}" if took else "")]
    logs = home / "logs"
    if summary.get("state") != "COMPLETED":
        out += [f"  {summary.get('message') or ''}".rstrip(),
                f"  logs: {logs / 'worker.log'} (the run's whole output), {logs / 'server.log'}",
                f"  run summary (JSON): {saved}"]
        return "\n".join(out)
    out += result_lines(res, saved, f"{logs} (worker.log: the run's whole output)")
    return "\n".join(out)


def result_lines(res: dict, saved: Path, logs: str) -> list[str]:
    """The end of a finished pipeline run, for a person (the deployment's and ``finsynth run``'s): the stages
    run, the score tables with a few test questions and each arm's answer, and where everything is.
    ``res``: the pipeline flow's result; ``saved``: where its JSON went; ``logs``: where the logs are."""
    out = [f"  stages run: {', '.join(res.get('executed', [])) or 'none'}; "
           f"cached: {', '.join(res.get('cached', [])) or 'none'}"]
    report = Path(res["report"]).parent if res.get("report") else None
    if report is not None and (report / "report.json").exists():
        from training.report import run_summary_text

        dataset = Path(res["dataset_card"]).parent if res.get("dataset_card") else None
        try:
            out += ["", run_summary_text(report, dataset)]
        except (OSError, ValueError, KeyError) as e:  # an old report: the paths below still say where it is
            out += ["", f"(no score table: {e})"]
    out += ["", "Outputs:"]
    named = [("dataset card", res.get("dataset_card")), ("adapter", res.get("adapter")),
             ("report", res.get("report")), ("run summary (JSON)", str(saved)), ("logs", logs)]
    w = max(len(k) for k, _ in named)
    out += [f"  {k.ljust(w)}  {v}" for k, v in named if v]
    return out


if __name__ == "__main__":
    sys.exit(main())
