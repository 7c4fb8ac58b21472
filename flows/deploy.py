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
import time
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
                   timeout_s: float = 3600) -> dict:
    """Start server and worker, deploy, run ``deployment`` with ``parameters``; return a summary."""
    t0 = time.monotonic()
    with local_prefect(home, port) as env:
        name = f"{FLOW_NAME}/{deployment}"
        print(f"[deploy] running {name} with {parameters}", flush=True)
        summary = {"deployment": name, "api_url": env["PREFECT_API_URL"],
                   **run_deployment_in(env, name, parameters, timeout_s)}
    summary["total_s"] = round(time.monotonic() - t0, 1)
    return summary


def run_deployment_in(env: dict[str, str], name: str, parameters: dict, timeout_s: float) -> dict:
    """Run in a child process (``python -m flows.deploy --child``) so this process's Prefect settings
    stay untouched; the child prints one ``@@RESULT@@`` JSON line."""
    r = subprocess.run([sys.executable, "-m", "flows.deploy", "--child", name, json.dumps(parameters), str(timeout_s)],
                       env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"run_deployment failed ({r.returncode}): {r.stderr[-3000:]}")


RESULT_MARK = "@@RESULT@@"


def _child_run(name: str, parameters: str, timeout_s: str) -> int:
    """The child side of :func:`run_deployment_in`: run the deployment, wait, print its summary."""
    from prefect.deployments import run_deployment

    fr = run_deployment(name, parameters=json.loads(parameters), timeout=float(timeout_s))
    res = None
    if fr.state and fr.state.is_completed():
        try:
            res = fr.state.result(raise_on_failure=False)
        except Exception as e:
            res = {"unavailable": str(e)}
    st = fr.state
    print(RESULT_MARK + json.dumps({"flow_run_id": str(fr.id), "flow_run_name": fr.name,
                                    "state": st.type.value if st else None, "state_name": st.name if st else None,
                                    "message": st.message if st else None, "result": res}, default=str))
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
    try:
        summary = deploy_and_run(deployment=args.deployment, parameters=params, home=args.home.resolve(),
                                 port=args.port, timeout_s=args.timeout)
    except (RuntimeError, OSError) as e:
        print(f"finsynth deploy: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    ok = summary.get("state") == "COMPLETED"
    res = summary.get("result") or {}
    print(f"\nflow run {summary.get('flow_run_name')}: {summary.get('state_name')}")
    if ok and isinstance(res, dict):
        print(f"  executed stages: {', '.join(res.get('executed', [])) or '(none: all cached)'}")
        for k in ("dataset_card", "adapter", "report"):
            if k in res:
                print(f"  {k.replace('_', ' ')}: {res[k]}")
    else:
        print(f"  logs: {args.home / 'logs'} (server.log, worker.log); message: {summary.get('message')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
