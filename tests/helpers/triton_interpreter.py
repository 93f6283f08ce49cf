"""Running Triton kernels on CPU in tests: TRITON_INTERPRET=1 is read when Triton is imported, so the
code runs in a fresh Python process."""

import os
import subprocess
import sys


def run_under_interpreter(code: str, timeout: int = 300) -> None:
    """Run `code` with TRITON_INTERPRET=1 in a fresh process; it must exit cleanly and print "ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
