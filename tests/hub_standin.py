"""A local stand-in for the Hugging Face Hub's HTTP API, enough for ``HfApi.create_repo``,
``create_branch`` and ``upload_folder``: on 127.0.0.1 only, it records every request (method,
path, query, headers, JSON or NDJSON body) and the files of each commit, and shuts itself down
after ``lifetime_s`` even if a test forgets to."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class HubStandIn:
    def __init__(self, lifetime_s: float = 120.0):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo id -> create_repo body
        self.branches: list[tuple[str, str]] = []
        self.pull_requests: list[dict] = []  # create_pull_request bodies (title, description, pullRequest)
        self.commits: list[dict] = []  # {"repo", "revision", "create_pr", "summary", "files": {path: bytes}}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def _handle(self, method: str):
                url = urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = {"method": method, "path": unquote(url.path), "query": parse_qs(url.query),
                          "authorization": self.headers.get("Authorization", ""), "body": raw}
                standin.requests.append(record)
                status, body = standin.answer(record)
                self._reply(status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def answer(self, r: dict) -> tuple[int, dict]:
        path, parts = r["path"], r["path"].strip("/").split("/")
        if r["method"] == "POST" and path == "/api/repos/create":
            body = json.loads(r["body"])
            repo = f"{body.get('organization') or body.get('namespace', 'user')}/{body['name']}" \
                if "/" not in body["name"] else body["name"]
            self.repos[repo] = body
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if r["method"] == "POST" and path == "/api/validate-yaml":  # the Hub checks a model card's header
            return 200, {"errors": [], "warnings": []}
        if len(parts) >= 5 and parts[:2] == ["api", "models"]:
            repo, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if action == "branch" and r["method"] == "POST":
                self.branches.append((repo, rest))
                return 200, {}
            if action == "discussions" and r["method"] == "POST":  # upload_folder(create_pr=True) opens a PR first
                self.pull_requests.append({"repo": repo, **json.loads(r["body"])})
                return 200, {"num": len(self.pull_requests)}
            if action == "discussions" and r["method"] == "GET":
                return 200, {"title": self.pull_requests[-1]["title"], "num": int(rest), "author": {"name": "t2l"},
                             "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft",
                             "repo": {"name": repo, "type": "model"}, "isPullRequest": True, "events": [],
                             "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []}
            if action == "preupload":
                files = json.loads(r["body"])["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "commit" and r["method"] == "POST":
                lines = [json.loads(x) for x in r["body"].decode().splitlines() if x.strip()]
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                         for x in lines if x["key"] == "file"}
                header = next((x["value"] for x in lines if x["key"] == "header"), {})
                create_pr = r["query"].get("create_pr", ["0"])[0] in ("1", "true", "True")
                self.commits.append({"repo": repo, "revision": rest, "create_pr": create_pr,
                                     "summary": header.get("summary", ""), "files": files})
                oid = f"{len(self.commits):040x}"
                answer = {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
                if create_pr:
                    answer["pullRequestUrl"] = f"{self.url}/{repo}/discussions/1"
                return 200, answer
        return 404, {"error": f"the stand-in does not know {r['method']} {path}"}
