"""Drives the web console of a running `align serve` in a real headless browser (chromium through
the DevTools protocol): the chat playground streams an answer equal to the API's, the dashboard
shows the run's stages and curves. Saves a screenshot of each view.

  python check_console.py --url http://127.0.0.1:PORT/ --model ID --prompt TEXT --want TEXT \
      --stage NAME --shots DIR [--api-key KEY] [--chromium PATH]
"""
import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import websocket


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


class Browser:
    def __init__(self, chromium):
        self.profile = tempfile.mkdtemp(prefix="align-console-")
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        import urllib.request
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    fail(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            fail(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, what, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.1)
        fail(f"timed out waiting for {what}")

    def shot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--want", required=True)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--shots", required=True)
    ap.add_argument("--api-key", default="")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args()
    os.makedirs(args.shots, exist_ok=True)
    b = Browser(args.chromium)
    try:
        b.call("Page.enable")
        b.call("Page.navigate", url=args.url)
        b.wait("document.readyState === 'complete'", "the page")
        if args.api_key:
            # typing the key reloads the model list
            b.eval(f"const k = document.getElementById('apikey'); k.value = {json.dumps(args.api_key)};"
                   "k.dispatchEvent(new Event('change')); true")
        b.wait(f"[...document.querySelectorAll('#model option')].some(o => o.value === {json.dumps(args.model)})",
               "the model list")
        b.eval(f"document.getElementById('model').value = {json.dumps(args.model)};"
               "document.getElementById('temperature').value = '0';"
               "document.getElementById('max_tokens').value = '12';"
               f"document.getElementById('input').value = {json.dumps(args.prompt)}; send(); true")
        b.wait("document.getElementById('stats').textContent.includes('tokens in')", "the streamed answer")
        got = b.eval("[...document.querySelectorAll('.msg.assistant')].map(m => m.textContent).pop()")
        if got != args.want:
            fail(f"the playground shows {got!r}, the API answered {args.want!r}")
        b.shot(os.path.join(args.shots, "chat.png"))
        print(f"chat playground: streamed {got!r}, equal to the API's answer")
        b.eval("show('runs'); true")
        b.wait(f"document.getElementById('runs').textContent.includes({json.dumps(args.stage)})", "the run dashboard")
        curves = b.wait("document.querySelectorAll('#runs svg polyline').length", "the curves")
        b.shot(os.path.join(args.shots, "runs.png"))
        print(f"dashboard: stage {args.stage!r} shown with {curves} curves")
    finally:
        b.close()
    print("OK")


if __name__ == "__main__":
    main()
