"""``finsynth ui``: the Prefect UI on the main command's home and database, until Ctrl-C.

    finsynth ui                          # PREFECT_HOME .prefect/ in the repo (what scripts/demo.sh uses)
    finsynth ui --home /tmp/h --port 0   # another home, a free port

The main command (``python -m flows.deploy``) runs its server with the UI off and stops it when the run
ends; this starts ``prefect server start --ui --no-services`` on 127.0.0.1 over the same SQLite database
(API and UI only: no scheduler, nothing runs), prints the URL of the latest flow run and of the
artifacts its stage runs created (dataset card, score table, loss curves, evaluation report), and waits.
A server this command started for the same home and still answering is reused: its URLs are printed
and the command returns (the running one keeps serving). ``ui.json`` in the home records it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from datagen.io import atomic_write_text
from flows.deploy import FLOW_NAME, _prefect, background, prefect_env, wait_healthy

DEFAULT_PORT = 4200
UI_RECORD = "ui.json"
# the artifact keys the pipeline creates (flows.pipeline.publish_artifacts), in the order a person reads them
ARTIFACT_KEYS = ("dataset-card", "token-lengths", "loss-curves", "judge-scores", "score-differences",
                 "evaluation-report")


def ui_env(home: Path, port: int) -> dict[str, str]:
    """:func:`flows.deploy.prefect_env` with the UI on (it talks to this server's API)."""
    env = prefect_env(home, port)
    env.update({"PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_UI_ENABLED": "true",
                "PREFECT_UI_API_URL": env["PREFECT_API_URL"],
                "PREFECT_UI_URL": f"http://127.0.0.1:{port}"})
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(port: int | None) -> int:
    """``port`` if given (0: any free one); else 4200 when free, else a free one."""
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else 0
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port


def running_ui(home: Path) -> str | None:
    """The base URL of a UI server recorded in ``home/ui.json`` that still serves the UI, or None."""
    try:
        rec = json.loads((home / UI_RECORD).read_text(encoding="utf-8"))
        url = rec["url"]
        ok = httpx.get(f"{url}/api/health", timeout=2).status_code == 200
        page = httpx.get(url, timeout=5)
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None
    return url if ok and page.status_code == 200 and "<html" in page.text.lower() else None


# ----------------------------------------------------------------------------- what to open
def _post(api: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = httpx.post(f"{api}{path}", json=body, timeout=15)
    r.raise_for_status()
    return r.json()


def latest_flow_run(api: str, flow_name: str = FLOW_NAME) -> dict[str, Any] | None:
    """The newest run of ``flow_name`` (the pipeline), else the newest flow run of any flow."""
    for flt in ({"flows": {"name": {"any_": [flow_name]}}}, {}):
        runs = _post(api, "/flow_runs/filter", {**flt, "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
        if runs:
            return runs[0]
    return None


def run_artifacts(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    """Artifacts with a key created by the flow run or by any run below it (stage flows are subflows)."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:  # subflow runs, level by level
        children = _post(api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": frontier}},
                                                    "limit": 200})
        frontier = [c["id"] for c in children if c["id"] not in ids]
        ids += frontier
    arts = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}, "key": {"exists_": True}},
                                            "sort": "CREATED_DESC", "limit": 200})
    latest: dict[str, dict[str, Any]] = {}
    for a in arts:  # newest first: keep one per key
        latest.setdefault(a["key"], a)
    order = {k: i for i, k in enumerate(ARTIFACT_KEYS)}
    return sorted(latest.values(), key=lambda a: (order.get(a["key"], len(order)), a["key"]))


def links(ui_url: str, api: str, flow_run_id: str | None = None) -> dict[str, Any]:
    """What to open: the latest pipeline run (or ``flow_run_id``) and each of its artifacts (and the
    key's page, which always shows the newest version)."""
    if flow_run_id:
        r = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=15)
        if r.status_code == 404:
            raise ValueError(f"no flow run {flow_run_id} in this database")
        r.raise_for_status()
        run = r.json()
    else:
        run = latest_flow_run(api)
    out: dict[str, Any] = {"ui": ui_url, "flow_run": None, "artifacts": []}
    if run is None:
        return out
    out["flow_run"] = {"label": "flow run" if flow_run_id else "latest flow run", "name": run["name"],
                       "state": (run.get("state") or {}).get("name"),
                       "url": f"{ui_url}/runs/flow-run/{run['id']}"}
    for a in run_artifacts(api, run["id"]):
        out["artifacts"].append({"key": a["key"], "type": a.get("type"),
                                 "url": f"{ui_url}/artifacts/artifact/{a['id']}",
                                 "key_url": f"{ui_url}/artifacts/key/{a['key']}"})
    return out


def describe(info: dict[str, Any]) -> str:
    lines = [f"Prefect UI: {info['ui']}"]
    run = info.get("flow_run")
    if run is None:
        lines.append("  no flow run in this database yet: run `bash scripts/demo.sh` first")
        return "\n".join(lines)
    lines.append(f"  {run['label']} {run['name']} ({run['state']}): {run['url']}")
    if not info["artifacts"]:
        lines.append("  it created no artifacts (yet)")
    for a in info["artifacts"]:
        lines.append(f"  {a['key']:<18} {a['url']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def serve(home: Path, port: int | None = None, *, flow_run_id: str | None = None, wait: bool = True,
          out=sys.stdout) -> int:
    """Reuse or start the UI server for ``home``, print where to look, and (``wait``) serve until
    Ctrl-C. Returns an exit status."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    _interrupt_on_signals()
    home = home.resolve()
    if not (home / "prefect.db").exists():
        print(f"finsynth ui: no Prefect database in {home} (run `bash scripts/demo.sh` first); "
              "starting an empty one", file=sys.stderr)
    url = running_ui(home)
    if url is not None:
        print(describe(links(url, f"{url}/api", flow_run_id)), file=out, flush=True)
        print(f"(reusing the UI server already running for {home})", file=out, flush=True)
        return 0
    port = pick_port(port)
    env = ui_env(home, port)
    api = env["PREFECT_API_URL"]
    ui_url = env["PREFECT_UI_URL"]
    log = home / "logs" / "ui-server.log"
    cmd = _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port), "--ui", "--no-services",
                   "--analytics-off")
    with background(cmd, env, log, "ui server") as proc:
        wait_healthy(api, proc, log, timeout_s=180)
        atomic_write_text(home / UI_RECORD, json.dumps({"url": ui_url, "pid": proc.pid}) + "\n")
        try:
            print(describe(links(ui_url, api, flow_run_id)), file=out, flush=True)
            if not wait:
                return 0
            print("serving until Ctrl-C", file=out, flush=True)
            while proc.poll() is None:
                time.sleep(0.5)
            print(f"finsynth ui: the server exited with {proc.returncode}; see {log}", file=sys.stderr)
            return 1
        finally:
            (home / UI_RECORD).unlink(missing_ok=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the server cleanly, also when this was started in the background by a
    shell that ignores SIGINT for background jobs."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)


def default_home() -> Path:
    from datagen.config import PROJECT_ROOT

    return Path(os.environ.get("FINSYNTH_PREFECT_HOME", PROJECT_ROOT / ".prefect"))
