"""The managed local provider ``kind: llamacpp_server``: finsynth builds llama.cpp's ``llama-server``
(once, cached), starts it on 127.0.0.1 with the packaged Gemma GGUF, talks to it over the OpenAI
wire protocol, reuses finished answers across processes, and stops it when the process exits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from typing import Literal

import pytest
from pydantic import BaseModel

from datagen.config import ProviderConfig
from datagen.llm import ChatRequest, make_provider, open_cache
from datagen.llm.llamacpp_server import LlamaServer, describe_exit, llama_server_binary

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="session")
def binary():
    if not os.environ.get("FINSYNTH_LLAMA_SERVER") and not (shutil.which("cmake") and shutil.which("ninja")):
        pytest.skip("building llama-server needs cmake and ninja (apt-get install cmake ninja-build g++)")
    return llama_server_binary()  # builds on the first run (~12 min on 2 cores), then cached


class Verdict(BaseModel):
    ok: bool
    answer: Literal["yes", "no"]


def pcfg(**kw) -> ProviderConfig:
    return ProviderConfig(kind="llamacpp_server", concurrency=2, context_tokens=512, timeout_s=120, **kw)


def test_managed_server_answers_plain_and_json_schema_and_a_rerun_is_free(binary, tmp_path):
    cache = tmp_path / "c.sqlite"
    p = make_provider("fast", pcfg(), open_cache(cache))
    assert p.kind == "llamacpp_server" and p.base_url.startswith("llamacpp_server:gemma")  # no port in the key
    reqs = [ChatRequest(messages=[{"role": "user", "content": f"Name a colour. [{i}]"}], max_tokens=8, seed=i)
            for i in range(3)]
    reqs.append(ChatRequest(messages=[{"role": "user", "content": "Is 7 greater than 3? Reply in JSON."}],
                            schema=Verdict, max_tokens=64))
    out = p.generate_batch(reqs)
    assert all(r.ok for r in out), [r.error for r in out]
    assert isinstance(out[-1].parsed, Verdict)  # json_schema honoured by llama-server
    assert p.usage.requests == 4 and p.usage.cache_hits == 0
    # a new provider (as in a new process) on the same cache file: every answer is reused
    again = make_provider("fast", pcfg(), open_cache(cache))
    out2 = again.generate_batch(reqs)
    assert [r.text for r in out2] == [r.text for r in out]
    assert again.usage.cache_hits == 4 and again.usage.requests == 0


def test_server_stops_with_the_process_that_started_it(binary, tmp_path):
    code = textwrap.dedent("""
        from datagen.config import ProviderConfig
        from datagen.llm import make_provider
        from datagen.llm.llamacpp_server import _SERVERS
        make_provider("fast", ProviderConfig(kind="llamacpp_server", context_tokens=256), None)
        print(next(iter(_SERVERS.values())).proc.pid, flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pid = int(r.stdout.split()[-1])
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, f"llama-server {pid} outlived the process that started it"


def test_a_binary_that_dies_is_named_with_its_signal(tmp_path):
    script = tmp_path / "dies.sh"
    script.write_text("#!/bin/sh\nkill -ILL $$\n")
    script.chmod(0o755)
    srv = LlamaServer(model_path=tmp_path / "unused.gguf", binary=script, start_timeout_s=30)
    with pytest.raises(RuntimeError, match=r"llama-server was killed by SIGILL \(exit -4\).*portable flags"):
        srv.start()
    assert "llama-server exited with status 3" in describe_exit(3, program="llama-server")


def test_the_server_loads_the_cpu_variant_this_cpu_runs_from_next_to_the_binary(binary, tmp_path):
    """One build for every x86 CPU: llama-server loads the best ``libggml-cpu-<kind>.so`` this CPU can run, from
    the cached binary's own folder (the build folder is gone): an AVX-512 CPU gets an AVX-512 kind, an AVX2-only
    one an AVX2 kind, and neither dies with SIGILL."""
    from lm.causal_lm import cpu_flags

    if os.environ.get("FINSYNTH_LLAMA_SERVER"):
        pytest.skip("FINSYNTH_LLAMA_SERVER names a binary of your own; this checks the one finsynth builds")
    assert len(list(binary.parent.glob("libggml-cpu-*.so"))) >= 10  # x64 ... sapphirerapids
    with LlamaServer(binary=binary, log_path=tmp_path / "server.log", n_ctx=256, parallel=1) as srv:
        kind = srv.cpu_backend()
        loaded = [ln for ln in open(f"/proc/{srv.proc.pid}/maps") if "libggml-cpu-" in ln]
    assert all(str(binary.parent.resolve()) in ln for ln in loaded), loaded
    flags = cpu_flags()
    avx512 = {"skylakex", "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "sapphirerapids"}
    if "avx512f" in flags:
        assert kind in avx512, (kind, sorted(flags))
    elif "avx2" in flags:
        assert kind in {"haswell", "alderlake"}, (kind, sorted(flags))
    else:
        assert kind in {"x64", "sse42", "sandybridge", "ivybridge", "piledriver"}, kind
