"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: real requests from huggingface_hub.

It speaks what create_repo, upload_folder (preupload, LFS basic transfer, ndjson commit),
repo_info, list_repo_tree and snapshot_download / hf_hub_download use, checks the bearer token,
and records every request so tests can see what the client did (and that no commit was made).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: list[tuple[str, dict[str, bytes]]] = [("0" * 40, {})]

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]


class HubServer:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_next: int = 0  # answer this many commit requests with 503 (a network failure mid-push)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits) - 1

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            # --- helpers ---------------------------------------------------------------------------
            def body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head: bool = False):
                data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def not_found(self, code: str, head: bool = False):
                self.send(404, {"error": code}, headers={"X-Error-Code": code}, head=head)

            def authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {server.token}":
                    return True
                self.send(401, {"error": "Invalid credentials"})
                return False

            def repo(self, repo_id: str, head: bool = False) -> Repo | None:
                r = server.repos.get(repo_id)
                if r is None:
                    self.not_found("RepoNotFound", head)
                return r

            # --- routes ----------------------------------------------------------------------------
            def do_POST(self):
                path = urlparse(self.path).path
                server.requests.append(("POST", path))
                body = self.body()
                if path == "/api/repos/create":
                    if not self.authorized():
                        return
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    url = f"{server.url}/{repo_id}"
                    if repo_id in server.repos:
                        return self.send(409, {"error": "You already created this model repo", "url": url})
                    server.repos[repo_id] = Repo(bool(req.get("private")) or req.get("visibility") == "private")
                    return self.send(200, {"url": url, "name": repo_id})
                if path == "/api/validate-yaml":
                    return self.send(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/(.+)/preupload/([^/]+)$", path)
                if m:
                    if not self.authorized():
                        return
                    repo = self.repo(m.group(1))
                    if repo is None:
                        return
                    files = repo.head[1]
                    out = []
                    for f in json.loads(body)["files"]:
                        lfs = f["path"].endswith(LFS_SUFFIXES)
                        entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                        if f["path"] in files:
                            content = files[f["path"]]
                            entry["oid"] = hashlib.sha256(content).hexdigest() if lfs else git_sha1(content)
                        out.append(entry)
                    return self.send(200, {"files": out, "commitOid": repo.head[0]})
                m = re.match(r"^/(.+)\.git/info/lfs/objects/batch$", path)
                if m:
                    req = json.loads(body)
                    objs = []
                    for o in req["objects"]:
                        item = {"oid": o["oid"], "size": o["size"]}
                        if o["oid"] not in server.lfs:
                            item["actions"] = {
                                "upload": {"href": f"{server.url}/lfs-upload/{o['oid']}"},
                                "verify": {"href": f"{server.url}/lfs-verify"},
                            }
                        objs.append(item)
                    return self.send(200, {"transfer": "basic", "objects": objs})
                if path == "/lfs-verify":
                    o = json.loads(body)
                    return self.send(200 if o["oid"] in server.lfs else 404, {})
                m = re.match(r"^/api/models/(.+)/commit/([^/]+)$", path)
                if m:
                    if not self.authorized():
                        return
                    if server.fail_next:
                        server.fail_next -= 1
                        return self.send(503, {"error": "Service unavailable"})
                    repo = self.repo(m.group(1))
                    if repo is None:
                        return
                    files = dict(repo.head[1])
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif key == "lfsFile":
                            files[value["path"]] = server.lfs[value["oid"]]
                        elif key == "deletedFile":
                            files.pop(value["path"], None)
                    sha = hashlib.sha1(
                        json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode() + repo.head[0].encode()
                    ).hexdigest()
                    repo.commits.append((sha, files))
                    return self.send(200, {"commitUrl": f"{server.url}/{m.group(1)}/commit/{sha}", "commitOid": sha})
                self.not_found("EntryNotFound")

            def do_PUT(self):
                path = urlparse(self.path).path
                server.requests.append(("PUT", path))
                m = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
                data = self.body()
                if m and hashlib.sha256(data).hexdigest() == m.group(1):
                    server.lfs[m.group(1)] = data
                    return self.send(200, {})
                self.send(400, {"error": "bad upload"})

            def _info(self, repo_id: str, repo: Repo):
                sha, files = repo.head
                return {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }

            def do_GET(self, head: bool = False):
                url = urlparse(self.path)
                path = unquote(url.path)
                server.requests.append(("HEAD" if head else "GET", path))
                m = re.match(r"^/api/models/(.+?)/tree/([^/]+)(?:/(.*))?$", path)
                if m:
                    repo = self.repo(m.group(1))
                    if repo is None:
                        return
                    _, files = repo.head
                    entries = []
                    for p, content in sorted(files.items()):
                        e = {"type": "file", "path": p, "size": len(content), "oid": git_sha1(content)}
                        if p.endswith(LFS_SUFFIXES):
                            e["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
                        entries.append(e)
                    return self.send(200, entries)
                m = re.match(r"^/api/models/(.+?)(?:/revision/([^/]+))?$", path)
                if m and not path.endswith("/tree"):
                    repo = self.repo(m.group(1))
                    if repo is None:
                        return
                    if repo.private and not self.authorized():
                        return
                    return self.send(200, self._info(m.group(1), repo))
                m = re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", path)
                if m:
                    repo = self.repo(m.group(1), head)
                    if repo is None:
                        return
                    sha, files = repo.head
                    name = m.group(3)
                    if name not in files:
                        return self.not_found("EntryNotFound", head)
                    content = files[name]
                    etag = hashlib.sha256(content).hexdigest() if name.endswith(LFS_SUFFIXES) else git_sha1(content)
                    headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha}
                    if name.endswith(LFS_SUFFIXES):
                        headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
                    return self.send(200, raw=content, headers=headers, head=head)
                self.not_found("EntryNotFound", head)

            def do_HEAD(self):
                self.do_GET(head=True)

        return Handler
