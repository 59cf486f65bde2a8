"""A stand-in Hugging Face Hub for offline tests: the HTTP endpoints huggingface_hub 2.x and transformers call.

Covers repo creation, branches, uploads (preupload, LFS "basic" batch transfer + PUT, NDJSON commits), repo info,
tree listings and file downloads (resolve, with the X-Repo-Commit / ETag / X-Linked-* headers the client checks, and
byte ranges, which `datasets` streaming reads parquet with).
No Xet: the LFS batch answers "basic" only, so clients must run with HF_HUB_DISABLE_XET=1.
Files live content-addressed (sha256) under `root/objects`; each commit is a full {path: sha256} snapshot.

    hub = FakeHub(tmp_path); hub.start()   # hub.url -> HF_ENDPOINT
    hub.files("model", "user/name")        # {path: bytes} at main
    hub.add_repo("dataset", "user/corpus", {"data/train.parquet": b"..."})  # a repo to read, without a client

By hand (e.g. to try push_to_hub.py): `python tests/hub_server.py --root /tmp/hub --port 8765`, then
`HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_anything python push_to_hub.py ...`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gif", ".npy", ".gguf", ".onnx")


def stored_in_lfs(path: str, sample: bytes, size: int) -> bool:
    """The Hub's rule, as the stand-in applies it: LFS for binary-looking, big or known-binary files."""
    return path.endswith(LFS_SUFFIXES) or b"\0" in sample or size >= 10 * 2**20


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeHub:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {private, sdk, branches, commits}
        self.requests: list[str] = []  # "METHOD /path", for assertions (e.g. no Xet endpoints were hit)
        self.ranges: list[str] = []  # "path bytes=a-b" of each byte range served (206)
        self.refuse_repo_types: set[str] = set()  # creating these answers 403 (to test partial pushes)
        self.lock = threading.Lock()
        self.server = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        hub = self

        class Handler(HubHandler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # port 0: the OS picks a free port
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # ---- storage ---------------------------------------------------------------------------------------------
    def blob(self, sha256: str) -> bytes:
        return (self.root / "objects" / sha256).read_bytes()

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / "objects" / sha).write_bytes(data)
        return sha

    def repo(self, repo_type: str, repo_id: str) -> dict:
        if (repo_type, repo_id) not in self.repos:
            raise HubError(404, "RepoNotFound", f"{repo_type} repo {repo_id} not found")
        return self.repos[(repo_type, repo_id)]

    def resolve(self, repo: dict, revision: str) -> str:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def tree(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, dict]:
        repo = self.repo(repo_type, repo_id)
        return repo["commits"][self.resolve(repo, revision)]["files"]

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What the repo holds at `revision`: {path: content}."""
        return {path: self.blob(entry["sha256"]) for path, entry in self.tree(repo_type, repo_id, revision).items()}

    def add_repo(self, repo_type: str, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create a repo holding `files` ({path: content}) in one commit on main; return the commit id."""
        repo = {"private": private, "sdk": "gradio" if repo_type == "space" else None, "branches": {}, "commits": {}}
        with self.lock:
            entries = {path: {"sha256": self.put_blob(data), "lfs": stored_in_lfs(path, data[:512], len(data))}
                       for path, data in files.items()}
            self.repos[(repo_type, repo_id)] = repo
            return self.add_commit(repo, "main", "add files", entries)

    def commit_count(self, repo_type: str, repo_id: str) -> int:
        return len(self.repo(repo_type, repo_id)["commits"])

    def add_commit(self, repo: dict, branch: str, message: str, files: dict) -> str:
        parent = repo["branches"].get(branch)
        oid = hashlib.sha1(json.dumps([parent, message, files, len(repo["commits"])]).encode()).hexdigest()
        repo["commits"][oid] = {"parent": parent, "message": message, "files": files}
        repo["branches"][branch] = oid
        return oid

    def entry_info(self, path: str, entry: dict) -> dict:
        """One file as the tree / paths-info APIs describe it."""
        data = self.blob(entry["sha256"])
        info = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        if entry["lfs"]:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry['sha256']}\nsize {len(data)}\n"
            info["oid"] = git_blob_oid(pointer.encode())
            info["lfs"] = {"oid": entry["sha256"], "size": len(data), "pointerSize": len(pointer)}
        return info


class HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ---- plumbing --------------------------------------------------------------------------------------------
    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def require_token(self):
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]  # unquote per segment: "int8%2Fconfig.json" stays one
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub.requests.append(f"{method} {url.path}")
        try:
            with self.hub.lock:
                self.route(method, parts, query)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self.send(err.status, {"error": err.message}, headers)

    # ---- routes ----------------------------------------------------------------------------------------------
    def route(self, method: str, parts: list[str], query: dict):
        hub = self.hub
        if parts[:2] == ["api", "whoami-v2"]:
            self.require_token()
            return self.send(200, {"type": "user", "name": "user", "auth": {"accessToken": {"role": "write"}}})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self.create_repo(json.loads(self.body()))
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.validate_yaml(json.loads(self.body()))
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            return self.repo_api(method, parts[1][:-1], "/".join(parts[2:4]), parts[4:], query)
        if method == "PUT" and parts[:1] == ["lfs-upload"]:
            return self.lfs_put(parts[1])
        # Git LFS batch: /{prefix}{ns}/{name}.git/info/lfs/objects/batch
        if method == "POST" and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type = "model" if len(parts) == 6 else parts[0][:-1]
            return self.lfs_batch(json.loads(self.body()), repo_type, "/".join(parts[-6:-4])[: -len(".git")])
        # Downloads: /{prefix}{ns}/{name}/resolve/{rev}/{path}
        if method in ("GET", "HEAD") and "resolve" in parts:
            i = parts.index("resolve")
            repo_type = "model" if i == 2 else parts[0][:-1]
            return self.download(repo_type, "/".join(parts[i - 2 : i]), parts[i + 1], "/".join(parts[i + 2 :]))
        raise HubError(404, None, f"stand-in Hub does not implement {method} {self.path}")

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.url}/{PREFIXES[repo_type]}{repo_id}"

    def create_repo(self, payload: dict):
        self.require_token()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = self.repo_url(repo_type, repo_id)
        if repo_type in self.hub.refuse_repo_types:
            raise HubError(403, None, f"You are not allowed to create {repo_type} repos")
        if (repo_type, repo_id) in self.hub.repos:
            return self.send(409, {"error": "You already created this repo", "url": url})
        if repo_type == "space" and payload.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, None, f"Invalid sdk {payload.get('sdk')!r}")
        repo = {"private": payload.get("visibility") == "private", "sdk": payload.get("sdk"), "branches": {},
                "commits": {}}
        self.hub.add_commit(repo, "main", "initial commit", {})
        self.hub.repos[(repo_type, repo_id)] = repo
        self.send(200, {"url": url, "name": repo_id})

    def validate_yaml(self, payload: dict):
        content = payload["content"]
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as err:
                return self.send(400, {"errors": [{"message": str(err)}], "warnings": []})
        self.send(200, {"errors": [], "warnings": []})

    def repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict):
        hub = self.hub
        repo = hub.repo(repo_type, repo_id)
        action = rest[0] if rest else "info"
        if action in ("info", "revision") and method == "GET":
            oid = hub.resolve(repo, rest[1] if rest else "main")
            files = repo["commits"][oid]["files"]
            info = {"id": repo_id, "sha": oid, "private": repo["private"], "disabled": False, "gated": False,
                    "siblings": [{"rfilename": path} for path in sorted(files)]}
            if query.get("blobs") in ("True", "true", "1"):
                info["siblings"] = [hub.entry_info(p, e) | {"rfilename": p} for p, e in sorted(files.items())]
            if repo_type == "space":
                info["sdk"] = repo["sdk"]
            return self.send(200, info)
        if action == "tree" and method == "GET":
            files = hub.tree(repo_type, repo_id, rest[1])
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive") in ("True", "true", "1")
            entries, folders = [], set()
            for path, entry in sorted(files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                relative = PurePosixPath(path).relative_to(prefix) if prefix else PurePosixPath(path)
                for depth in range(1, len(relative.parts)):  # every folder on the way to the file
                    folders.add(str(PurePosixPath(prefix, *relative.parts[:depth])))
                if recursive or len(relative.parts) == 1:
                    entries.append(hub.entry_info(path, entry))
            if prefix and not entries and not folders:
                raise HubError(404, "EntryNotFound", f"{prefix} does not exist at {rest[1]}")
            if not recursive:
                folders = {f for f in folders if PurePosixPath(f).parent == PurePosixPath(prefix or ".")}
            dirs = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in folders]
            return self.send(200, sorted(dirs, key=lambda d: d["path"]) + entries)
        if action == "paths-info" and method == "POST":
            form = parse_qs(self.body().decode())
            files = hub.tree(repo_type, repo_id, rest[1])
            return self.send(200, [hub.entry_info(p, files[p]) for p in form.get("paths", []) if p in files])
        if action == "preupload" and method == "POST":
            self.require_token()
            return self.preupload(repo, rest[1], json.loads(self.body()))
        if action == "commit" and method == "POST":
            self.require_token()
            return self.commit(repo_type, repo_id, repo, "/".join(rest[1:]), self.body())
        if action == "branch" and method == "POST":
            self.require_token()
            branch = "/".join(rest[1:])
            if branch in repo["branches"]:
                raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
            start = json.loads(self.body() or b"{}").get("startingPoint") or "main"
            repo["branches"][branch] = hub.resolve(repo, start)
            return self.send(200, {})
        raise HubError(404, None, f"stand-in Hub does not implement {method} {self.path}")

    def preupload(self, repo: dict, revision: str, payload: dict):
        files = self.current_files(repo, revision)
        answer = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = stored_in_lfs(item["path"], sample, item["size"])
            info = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if item["path"] in files:  # lets the client drop unchanged files from the commit
                existing = files[item["path"]]
                info["oid"] = existing["sha256"] if existing["lfs"] else git_blob_oid(self.hub.blob(existing["sha256"]))
            answer.append(info)
        self.send(200, {"files": answer, "commitOid": repo["branches"].get(revision)})

    def current_files(self, repo: dict, revision: str) -> dict:
        oid = repo["branches"].get(revision)
        if oid is None:
            raise HubError(404, "RevisionNotFound", f"Branch {revision} does not exist; create it first")
        return repo["commits"][oid]["files"]

    def lfs_batch(self, payload: dict, repo_type: str, repo_id: str):
        self.require_token()
        self.hub.repo(repo_type, repo_id)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, None, "stand-in Hub only supports LFS uploads with the basic transfer")
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.hub.root / "objects" / obj["oid"]).exists():
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        self.send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, oid: str):
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, None, f"uploaded content does not match sha256 {oid}")
        self.hub.put_blob(data)
        self.send(200, {})

    def commit(self, repo_type: str, repo_id: str, repo: dict, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        files = dict(self.current_files(repo, revision))
        if header.get("parentCommit") not in (None, repo["branches"][revision]):
            raise HubError(412, None, "parentCommit is not the head of the branch")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = {"sha256": self.hub.put_blob(base64.b64decode(value["content"])), "lfs": False}
            elif key == "lfsFile":
                if not (self.hub.root / "objects" / value["oid"]).exists():
                    raise HubError(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = {"sha256": value["oid"], "lfs": True}
            elif key == "deletedFile":
                files.pop(value["path"])
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, None, f"unknown commit operation {key}")
        oid = self.hub.add_commit(repo, revision, header["summary"], files)
        url = f"{self.repo_url(repo_type, repo_id)}/commit/{oid}"
        self.send(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

    def download(self, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self.hub.repo(repo_type, repo_id)
        oid = self.hub.resolve(repo, revision)
        entry = repo["commits"][oid]["files"].get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}") from None
        data = self.hub.blob(entry["sha256"])
        info = self.hub.entry_info(path, entry)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{info["oid"]}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        if entry["lfs"]:  # the client keys its cache on the LFS sha256, as on the real Hub
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": len(data)}
        status, data = self.byte_range(data, headers)
        self.send(status, headers=headers, raw=data)

    def byte_range(self, data: bytes, headers: dict) -> tuple[int, bytes]:
        """Honour a `Range: bytes=a-b` / `bytes=a-` / `bytes=-n` header as the Hub does: 206 with the slice."""
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes=") or "," in spec:
            return 200, data
        first, _, last = spec[len("bytes="):].partition("-")
        start = len(data) - int(last) if not first else int(first)
        end = len(data) - 1 if not first or not last else min(int(last), len(data) - 1)
        if start >= len(data) or start > end:
            raise HubError(416, None, f"Range {spec} not satisfiable for {len(data)} bytes")
        headers["Content-Range"] = f"bytes {max(start, 0)}-{end}/{len(data)}"
        self.hub.ranges.append(f"{urlsplit(self.path).path} {spec}")
        return 206, data[max(start, 0) : end + 1]


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Serve the stand-in Hub until Ctrl+C (state is kept in memory).")
    parser.add_argument("--root", help="where uploaded files are stored (default: a new temp dir)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    hub = FakeHub(args.root or tempfile.mkdtemp(prefix="toygpt-hub-"))
    print(f"stand-in Hub on {hub.start(args.port)} storing files in {hub.root}; "
          "HF_ENDPOINT to this URL, HF_HUB_DISABLE_XET=1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()
