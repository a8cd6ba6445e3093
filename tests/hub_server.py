"""A loopback stand-in for the Hugging Face Hub's HTTP API, enough for the real huggingface_hub client
to create repos, commit files, and download them back (see the calls listed in the stack notes)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.uploaded_bodies: list[bytes] = []
        self.failures: dict[str, list[int]] = {}  # path regex -> statuses to answer first, in order
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- helpers -----------------------------------------------------------------------------------
    def reply(self, handler, status: int, body=None, headers: dict | None = None, head: bool = False):
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    def handle(self, h, method: str):
        path = h.path.split("?")[0]
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        self.requests.append((method, path))
        for pattern, statuses in self.failures.items():
            if statuses and re.search(pattern, path):
                return self.reply(h, statuses.pop(0), {"error": "injected failure"})
        auth = h.headers.get("Authorization", "")
        writes = method == "POST" and path not in ("/api/validate-yaml",)
        if writes and auth != f"Bearer {self.token}":
            return self.reply(h, 401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            exists = repo in self.repos
            self.repos.setdefault(repo, {})
            return self.reply(h, 409 if exists else 200, {"url": f"{self.url}/{repo}", "error": "exists" if exists else None})
        if path == "/api/validate-yaml":
            return self.reply(h, 200, {"errors": [], "warnings": []})
        if path == "/api/whoami-v2":
            return self.reply(h, 200, {"name": "tester", "type": "user", "orgs": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(\w+)", path)
        if match:
            files = json.loads(body)["files"]
            return self.reply(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(\w+)", path)
        if match:
            repo = match.group(1)
            self.uploaded_bodies.append(body)
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = hashlib.sha1(json.dumps(sorted(self.repos[repo])).encode() + body).hexdigest()
            self.commits[repo] = sha
            return self.reply(h, 200, {"commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}"})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if match:
            repo = match.group(1)
            if repo not in self.repos:
                return self.reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return self.reply(h, 200, {"id": repo, "modelId": repo, "sha": self.commits.get(repo, "0" * 40),
                                       "private": False, "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]})
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            repo, _, filename = match.groups()
            files = self.repos.get(repo, {})
            if filename not in files:
                return self.reply(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"},
                                  head=method == "HEAD")
            data = files[filename]
            headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self.reply(h, 200, data, headers, head=method == "HEAD")
        return self.reply(h, 404, {"error": f"not implemented: {method} {path}"})
