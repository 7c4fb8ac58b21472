"""Fail loudly, lose nothing, leak nothing (issue 11): a dead or refusing teacher fails the stage
with one line and no manifest; keys echoed back by a server never reach a record; a stage's output
cannot sit under another run's manifest; two runs on one root do not both run. Real local servers on
127.0.0.1 (the fault proxy's echo mode speaks the OpenAI wire protocol)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from llm_fakes import FaultProxy
from test_augment import CLS, QA
from test_rephrase import AnchorEmbedder

from flows.stages import invoke
from datagen.config import load_config
from datagen.io import (
    IN_PROGRESS,
    StageNotFinished,
    StageOutputError,
    begin_stage,
    read_jsonl,
    read_manifest,
    require_stage,
    write_jsonl,
    write_manifest,
)
from datagen.manifest import Manifest
from datagen.llm import LLMUnavailable
from datagen.llm.keys import redact, register_secret
from flows.lock import run_lock
from flows.stages import execute

KEY = "sk-test-reliability-0123456789abcdef"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _cfg(tmp_path, url: str, **extra):
    overrides = [
        "llm.providers.teacher.kind=openai", "llm.providers.teacher.model=fake",
        f"llm.providers.teacher.base_url={url}", "llm.providers.teacher.api_key_env=FINSYNTH_TEST_KEY",
        "llm.providers.teacher.max_retries=1", "llm.providers.teacher.backoff_base_s=0.01",
        "llm.providers.teacher.backoff_max_s=0.02", "llm.providers.teacher.timeout_s=5",
        "llm.providers.teacher.concurrency=2",
        "augment.provider=teacher", "augment.scenario.enabled=false", "augment.k=3", "augment.limit=null",
        "augment.candidates=1", "augment.max_attempts=2",  # the counts below (66 calls) assume 2 attempts
        *[f"{k}={v}" for k, v in extra.items()]]
    cfg = load_config(profile="demo", root=tmp_path, overrides=overrides)
    fetch = cfg.paths.stage_dir("fetch")
    rows = [{**QA, "id": f"q{i}", "group_id": f"g{i}"} for i in range(10)] + [CLS]
    write_jsonl(fetch / "samples.jsonl", rows)
    write_manifest(fetch, Manifest(stage="fetch"))
    return cfg


def _embedder():
    return AnchorEmbedder({QA["question"], CLS["question"]}, {})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FINSYNTH_TEST_KEY", KEY)


def test_dead_teacher_fails_the_stage_with_one_line_and_no_manifest(tmp_path):
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_closed_port()}/v1")
    # through the stage runner: the probe fails before any work
    with pytest.raises(LLMUnavailable, match=r"provider 'teacher' is not reachable at http://127\.0\.0\.1"):
        execute(cfg, "augment")
    # the stage function alone (no probe): the failure-rate check fails it after the calls
    with pytest.raises(LLMUnavailable, match=r"augment \(rephrase\): provider 'teacher' .* failed 66 of 66 calls; "
                                             r"most common error: connection x66"):
        invoke(cfg, "augment", embedder=_embedder())
    assert read_manifest(cfg.paths.stage_dir("augment")) is None


def test_unauthorised_teacher_stops_at_first_401_and_leaks_no_key(tmp_path):
    with FaultProxy(rates={"401": 1.0}) as proxy:
        cfg = _cfg(tmp_path, proxy.url + "/v1")
        with pytest.raises(LLMUnavailable, match="refused our credentials") as e:
            invoke(cfg, "augment", embedder=_embedder())
        assert KEY not in str(e.value)
        assert proxy.total_received <= 2  # the calls already in flight (concurrency 2), then none
        with pytest.raises(LLMUnavailable, match="refused our credentials"):
            execute(cfg, "augment")  # the probe (models list) passes; the first call is refused
    assert read_manifest(cfg.paths.stage_dir("augment")) is None


def test_some_failures_below_the_limit_still_finish(tmp_path):
    with FaultProxy(always={"?": "ok"}, rates={"500": 0.2}, seed=3,
                    responder=lambda body, tag: "What was the return of ACME?") as proxy:
        cfg = _cfg(tmp_path, proxy.url + "/v1", **{"llm.providers.teacher.max_retries": 0})
        m = invoke(cfg, "augment", embedder=_embedder())
    assert m.rephrase["slots"] == 33 and read_manifest(cfg.paths.stage_dir("augment"))


def test_echoed_key_never_reaches_rejections(tmp_path):
    with FaultProxy(rates={"echo400": 1.0}) as proxy:
        cfg = _cfg(tmp_path, proxy.url + "/v1", **{"llm.max_failure_rate": 1.0})
        with pytest.raises(LLMUnavailable, match="http_400 x66"):  # all failed: still loud
            invoke(cfg, "augment", embedder=_embedder())
        assert set(proxy.auth) == {f"Bearer {KEY}"}  # the key did reach the server, which echoed it
    # the redaction itself, on every shape a server echoes
    register_secret(KEY)
    for text in (f"Authorization: Bearer {KEY}", f'{{"api_key": "{KEY}"}}', f"x-api-key={KEY}", KEY[3:] + KEY):
        assert KEY not in (redact(text) or "") and "[REDACTED]" in redact(text)
    assert redact("nothing secret, 3.42% on 2024-02-14") == "nothing secret, 3.42% on 2024-02-14"


def test_rejections_hold_no_key_when_errors_are_partial(tmp_path):
    # half the items answer, half are refused with the key echoed back: the stage finishes, and the
    # rejection records (which keep the error text) carry no key
    def responder(body, tag):
        return "What was the return of ACME?"

    with FaultProxy(rates={"echo400": 0.3}, seed=1, responder=responder) as proxy:
        cfg = _cfg(tmp_path, proxy.url + "/v1", **{"llm.providers.teacher.max_retries": 0})
        invoke(cfg, "augment", embedder=_embedder())
        assert proxy.faults["echo400"] > 0
    out = cfg.paths.stage_dir("augment")
    blob = (out / "rejections.jsonl").read_text() + (out / "manifest.json").read_text()
    assert "llm_error" in blob and KEY not in blob and "Bearer sk-" not in blob


def test_output_replaced_but_manifest_not_written_is_refused_downstream(tmp_path):
    cfg = load_config(profile="tiny", root=tmp_path)
    aug = cfg.paths.stage_dir("augment")
    write_jsonl(aug / "samples.jsonl", [QA, CLS])
    write_manifest(aug, Manifest(stage="augment"))
    require_stage(aug, "augment")
    # a rerun starts, replaces the output, and is killed before its manifest
    begin_stage(aug)
    write_jsonl(aug / "samples.jsonl", [QA])
    assert (aug / IN_PROGRESS).exists()
    with pytest.raises(StageNotFinished, match=r"'augment' has no finished output .*IN_PROGRESS"):
        require_stage(aug, "augment")
    # a finished manifest over files that changed afterwards: refused with path, expected vs found hash
    write_jsonl(aug / "samples.jsonl", [QA, CLS])
    write_manifest(aug, Manifest(stage="augment"))
    write_jsonl(aug / "samples.jsonl", [QA])
    with pytest.raises(StageOutputError, match=r"samples\.jsonl does not match its manifest \(expected sha256 "
                                               r"[0-9a-f]{12}, found [0-9a-f]{12}\)"):
        require_stage(aug, "augment")
    with pytest.raises(StageOutputError):
        execute(cfg, "dedup")  # the stage runner refuses before it touches dedup's folder


@pytest.mark.parametrize("text", ["{not json", "[]", '{"stage": "augment", "outputs": "samples.jsonl"}',
                                  '{"stage": "augment", "outputs": {}, "counts": [1, 2]}'])
def test_a_corrupt_or_foreign_manifest_is_one_line_naming_it(tmp_path, text, capsys):
    """A manifest.json that is not JSON, not an object, or whose fields have the wrong types (hand-edited,
    truncated by a full disk, written by something else): the stage that reads it says which file and what
    to do, in one line, and the orchestration treats the folder as unfinished (it reruns)."""
    from flows.cli import main

    cfg = load_config(profile="tiny", root=tmp_path)
    aug = cfg.paths.stage_dir("augment")
    write_jsonl(aug / "samples.jsonl", [QA, CLS])
    (aug / "manifest.json").write_text(text)
    with pytest.raises(StageOutputError, match=r"augment/manifest\.json is not a finsynth manifest .*rerun"):
        require_stage(aug, "augment")
    assert main(["dedup", "--profile", "tiny", "--root", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "augment/manifest.json is not a finsynth manifest" in err and "Traceback" not in err


def test_killed_between_output_and_manifest_leaves_no_finished_stage(tmp_path):
    """A real process killed (SIGKILL) after it replaced its output and before its manifest."""
    cfg = load_config(profile="tiny", root=tmp_path)
    aug = cfg.paths.stage_dir("augment")
    write_jsonl(aug / "samples.jsonl", [QA, CLS])
    write_manifest(aug, Manifest(stage="augment"))
    script = textwrap.dedent(f"""
        import os, signal
        from datagen.io import begin_stage, write_jsonl
        begin_stage({str(aug)!r})
        write_jsonl({str(aug / "samples.jsonl")!r}, [{{"id": "new"}}])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == -9
    assert read_manifest(aug) is None and len(read_jsonl(aug / "samples.jsonl")) == 1
    with pytest.raises(StageNotFinished):
        require_stage(aug, "augment")


def test_second_run_on_the_same_root_fails_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from flows.lock import run_lock
        with run_lock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"another finsynth run is using {tmp_path} \(pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
        with run_lock(tmp_path / "other"):  # another root is free
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # released when its holder died
        with run_lock(tmp_path):  # re-entrant in one thread
            pass


