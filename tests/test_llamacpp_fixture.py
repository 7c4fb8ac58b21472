"""The llama.cpp server wrapper fails loudly when the server dies: a process killed by SIGILL on its
first completion (what a -march=native build does on a CPU that lacks an instruction) is reported with
the signal's name and the fix, not as a connection error in every later test."""

from __future__ import annotations

import sys
import textwrap

import pytest

from datagen.llm.llamacpp_server import LlamaCppServer, describe_exit

# answers /v1/models like llama_cpp.server, then dies by SIGILL on the first completion
DIES_ON_COMPLETION = textwrap.dedent("""
    import os, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            body = b'{"object": "list", "data": [{"id": "gemma3-270m", "object": "model"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            os.kill(os.getpid(), signal.SIGILL)

    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_describe_exit_names_the_signal_and_the_fix():
    msg = describe_exit(-4)
    assert "SIGILL" in msg and "portable" in msg and "setup.sh" in msg
    assert "SIGKILL" in describe_exit(-9) and "status 3" in describe_exit(3)


def test_server_killed_by_sigill_on_first_completion_is_reported(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(DIES_ON_COMPLETION)
    srv = LlamaCppServer(model_path=tmp_path / "unused.gguf", log_path=tmp_path / "server.log",
                         start_timeout_s=30)
    srv.cmd = [sys.executable, str(script), str(srv.port)]
    with pytest.raises(RuntimeError, match=r"killed by SIGILL \(exit -4\).*portable"):
        srv.start()
    assert srv.proc is None or srv.proc.poll() is not None
