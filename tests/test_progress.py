"""What the main command shows while it runs (datagen.progress, flows.progress): stage lines with rows
and drops, throttled progress lines, the terminal printer, and a run in this process whose library
noise goes to a log file while the terminal gets the finsynth lines only."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

from datagen.manifest import DedupManifest, FetchManifest, Manifest, TrainManifest
from datagen.progress import Progress, seconds, stage_done_line
from flows.progress import Terminal, TerminalHandler


def test_stage_done_line_names_rows_and_drops_by_reason():
    m = DedupManifest(counts={"samples": 198, "dropped_near_duplicate": 15, "dropped_conflicting_answer": 2,
                              "dropped_other": 0})
    assert m.rows_out() == 198 and m.drops() == {"near_duplicate": 15, "conflicting_answer": 2}
    assert stage_done_line("dedup", m, 12.3, rows_in=215) == \
        "dedup: done in 12 s: 215 -> 198 rows; dropped: near_duplicate 15, conflicting_answer 2"
    assert stage_done_line("train", TrainManifest(steps=6, final_train_loss=2.3456), 161.0) == \
        "train: done in 2 min 41 s: 6 steps, final loss 2.346"
    assert stage_done_line("x", Manifest(stage="x", counts={"splits": {"train": 3, "test": 2}}), 0.25) == \
        "x: done in 0.2 s: 5 rows"
    fetch = FetchManifest(counts={"samples": 170},
                          quarantine={"total": 3, "by_reason": {"bad_date": 1, "empty_answer": 2}})
    assert stage_done_line("fetch", fetch, 1.0) == (
        "fetch: done in 1.0 s: 170 rows; quarantined 3: empty_answer 2, bad_date 1")
    assert seconds(0.44) == "0.4 s" and seconds(41.2) == "41 s" and seconds(185) == "3 min 05 s"


def test_progress_logs_the_first_step_then_at_most_every_interval_and_always_the_last(caplog):
    caplog.set_level(logging.INFO, logger="finsynth.progress")
    p = Progress("rephrase attempt 1/3", 5, "requests", every_s=3600)
    for _ in range(5):
        p.update(1)
    p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("rephrase attempt 1/3 1/5 requests (")
    assert lines[1].startswith("rephrase attempt 1/3 5/5")
    caplog.clear()
    with Progress("generate base", None, "batches", every_s=3600) as q:
        q.update(2, loss=1.23456)
        q.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "2 batches" in lines[0] and "loss 1.235" in lines[0] and " 3 batches" in lines[1]


def test_terminal_rewrites_a_progress_line_on_a_tty_and_not_in_a_file():
    buf = io.StringIO()
    t = Terminal(buf, tty=True)
    t.line("train step 1/6", progress=True, when=0)
    t.line("train step 2/6", progress=True, when=0)
    t.line("train: done", when=0)
    out = buf.getvalue()
    assert out.count("\n") == 1 and out.count("\r\033[K") == 3 and out.endswith("train: done\n")
    buf = io.StringIO()
    Terminal(buf, tty=False).line("train step 1/6", progress=True, when=0)
    assert buf.getvalue().endswith("  train step 1/6\n") and "\r" not in buf.getvalue()


def test_terminal_handler_passes_finsynth_records_only():
    buf = io.StringIO()
    h = TerminalHandler(Terminal(buf, tty=False))
    for name in ("finsynth.stage", "finsynth.progress", "prefect.flow_runs", "httpx", "finsynthx"):
        rec = logging.LogRecord(name, logging.INFO, __file__, 1, f"from {name}", None, None)
        if h.filter(rec):
            h.handle(rec)
    assert [ln.split("  ", 1)[1] for ln in buf.getvalue().splitlines()] == \
        ["from finsynth.stage", "from finsynth.progress"]


def test_quiet_terminal_sends_everything_else_to_the_log_file(tmp_path):
    """A child process so that file descriptors 1 and 2 of the test runner stay untouched."""
    log = tmp_path / "run.log"
    code = textwrap.dedent(f"""
        import logging, subprocess, sys, warnings
        from flows.progress import quiet_terminal
        logging.basicConfig(level=logging.INFO)
        with quiet_terminal({str(log)!r}) as (out, terminal):
            logging.getLogger("httpx").info("HTTP Request: GET /api/health")
            warnings.warn("a library warning")
            print("a stray print")
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child noise\\\\n')"])
            logging.getLogger("finsynth.stage").info("fetch: started")
            print('{{"result": 1}}', file=out)
        logging.getLogger("prefect").info("Stopping temporary server")  # at exit: still the log file
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == '{"result": 1}\n'
    assert p.stderr.splitlines() == [p.stderr.splitlines()[0]] and p.stderr.rstrip().endswith("  fetch: started")
    text = log.read_text()
    for noise in ("HTTP Request", "a library warning", "a stray print", "child noise", "Stopping temporary server",
                  "fetch: started"):
        assert noise in text, noise


def test_a_quiet_batch_still_shows_its_position_until_it_closes(caplog):
    """A batch decoded together finishes all at once: meanwhile the heartbeat logs where it is, and it
    stops when the bar closes."""
    import time

    from datagen.progress import PROGRESS_LOGGER, Progress

    caplog.set_level("INFO", logger=PROGRESS_LOGGER)
    bar = Progress("scenarios", 8, "requests", heartbeat_s=0.1)
    time.sleep(0.35)
    quiet = [r.getMessage() for r in caplog.records]
    assert len(quiet) >= 2 and all(m.startswith("scenarios 0/8 requests (") for m in quiet), quiet
    bar.update(8)
    bar.close()
    n = len(caplog.records)
    assert caplog.records[-1].getMessage().startswith("scenarios 8/8 requests")
    time.sleep(0.3)
    assert len(caplog.records) == n  # closed: no more lines


def test_the_main_command_converts_the_packaged_model_while_the_server_starts(tmp_path, monkeypatch):
    """``flows.deploy.warm_models``: the run's packaged models are prepared in a thread of the main command,
    its lines on the same terminal; nothing is started when they are converted already."""
    from datagen.config import load_config
    from flows import deploy
    from lm import packaged

    assert deploy.packaged_models(load_config(None, profile="demo")) == ["packaged:gemma3-270m"]
    buf = io.StringIO()
    terminal = Terminal(buf, tty=False)
    monkeypatch.setenv("FINSYNTH_MODEL_CACHE", str(tmp_path / "models"))
    assert not packaged.converted("packaged:gemma3-270m") and packaged.converted("packaged:all-minilm-l6-v2")
    calls = []
    monkeypatch.setattr(packaged, "gemma_path", lambda: calls.append("convert") or tmp_path)  # the 1-min conversion
    thread = deploy.warm_models("demo", None, [], terminal)
    assert thread is not None
    thread.join(60)
    assert calls == ["convert"] and "[models] packaged:gemma3-270m ready in " in buf.getvalue()
    (tmp_path / "models" / packaged.GEMMA_DIR).mkdir(parents=True)
    (tmp_path / "models" / packaged.GEMMA_DIR / ".complete").write_text("ok\n")
    assert deploy.warm_models("demo", None, [], terminal) is None  # converted: nothing to do
    assert deploy.warm_models("no-such-profile", None, [], terminal) is None  # the run reports a bad profile


def test_the_conversion_shows_no_progress_bars_and_gives_them_back():
    """Inside ``lm.packaged._quiet_one_gguf_parse`` (the conversion, which may run in the main command's
    terminal), transformers' bars and the GGUF dequantization bar are off; afterwards they are as before."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from lm.packaged import _quiet_one_gguf_parse

    before = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    out = io.StringIO()
    with _quiet_one_gguf_parse():
        assert not hf_logging.is_progress_bar_enabled()
        for _ in gguf_utils.tqdm(range(3), desc="Converting", file=out):
            pass
    assert out.getvalue() == ""
    assert gguf_utils.tqdm is before and hf_logging.is_progress_bar_enabled()


def test_augment_line_shows_the_measured_precision_of_kept_rephrasings():
    from datagen.manifest import AugmentManifest

    m = AugmentManifest(counts={"rows": 40}, rephrase={"kept": 7, "measured_precision": {
        "measured": True, "precision": 0.9231, "ci": [0.8, 1.0]}})
    assert stage_done_line("augment", m, 3.0).endswith(
        "; kept rephrasings' precision, measured on hand-labelled outputs of this model: 0.92 [0.80, 1.00]")
    m.rephrase["measured_precision"] = {"measured": False, "why": "other model"}
    assert "precision" not in stage_done_line("augment", m, 3.0)
