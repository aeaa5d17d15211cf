"""Headless Chromium for the tests, driven over the Chrome DevTools Protocol through a pipe.

No browser library: the system's Chromium (Debian's package `chromium`) started with
--remote-debugging-pipe reads JSON commands, each ended by a NUL byte, on its file descriptor 3 and
writes answers and events the same way on 4. `Browser` sends a command and waits for the answer
with the same id, skipping events; a page is a session ("flatten" mode: the session id rides in
each message).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]

# Chromium wants its pipe on fds 3 and 4: a small Python moves them there, then becomes Chromium.
LAUNCHER = """import fcntl, os, sys
commands, answers = (fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3])
os.dup2(commands, 3)
os.dup2(answers, 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, executable: str, profile_dir: Path, timeout: float = 20) -> None:
        commands_read, self.commands = os.pipe()  # we write, Chromium reads on its fd 3
        self.answers, answers_write = os.pipe()  # Chromium writes on its fd 4, we read
        self.timeout, self.buffer, self.last_id = timeout, b"", 0
        with open(profile_dir / "chromium.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(commands_read), str(answers_write), executable, *FLAGS,
                 f"--user-data-dir={profile_dir / 'profile'}", "about:blank"],
                pass_fds=(commands_read, answers_write), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(commands_read)
        os.close(answers_write)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command, return its result; RuntimeError with Chromium's message on an error."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        pending = json.dumps(message).encode("utf-8") + b"\0"
        while pending:
            pending = pending[os.write(self.commands, pending):]
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self.receive(deadline)
            if answer.get("id") == self.last_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self.answers, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed its pipe (exit code {self.process.poll()})")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> str:
        """A new tab at `url`; returns its session id."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str):
        """Poll until `expression` is truthy; its value."""
        deadline = time.monotonic() + self.timeout
        while not (value := self.evaluate(session, expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {self.timeout} s: {expression}")
            time.sleep(0.05)
        return value

    def type_into(self, session: str, selector: str, text: str) -> None:
        """Focus the element and type `text` as a keyboard would insert it."""
        self.evaluate(session, f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", session, text=text)

    def click(self, session: str, selector: str) -> None:
        """A real mouse click (press, release) at the middle of the element's box, scrolled into view."""
        x, y = self.evaluate(session, f"""(() => {{ const element = document.querySelector({json.dumps(selector)});
            element.scrollIntoView({{block: "center"}}); const box = element.getBoundingClientRect();
            return [box.x + box.width / 2, box.y + box.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session, type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
