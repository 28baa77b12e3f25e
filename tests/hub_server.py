"""A local Hugging Face Hub for tests: the real huggingface_hub client talks to it over HTTP.

It implements the endpoints in shared/design/PROTOCOLS.md faithfully enough for the client:
model info and revisions, trees, resolve (HEAD/GET), refs, commits, repo creation, settings,
preupload, the LFS batch API (basic transfer: PUT + verify), NDJSON commits (with ``parentCommit``
and ``create_pr``), tags, discussions and comments, whoami with token checks, private and gated
repos, and the Jobs API (``run_job``). State lives in memory; every request is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
_INVALID_TOKEN = {"X-Error-Message": "Invalid credentials in Authorization header"}


@dataclass
class Fault:
    """What the next matching request gets instead of a normal reply.

    ``drop``: the connection breaks mid-reply; ``bad-json``: a 200 whose body is not JSON; ``error-500``: a
    500 with a long server message; ``no-id`` / ``no-sha``: the normal JSON reply without that field;
    ``lost-reply``: the request is carried out, then the client gets a 412 (its reply was lost and a
    retry found the branch moved); ``pass``: only the hook. ``hook`` runs first (e.g. to kill the
    client process, or to land another commit), except with ``lost-reply``, where it runs once the
    request is carried out and before the 412 is sent.
    """

    method: str
    path_part: str
    action: str
    hook: Callable[[], None] | None = None


@dataclass
class User:
    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"


@dataclass
class StoredFile:
    size: int
    blob_oid: str
    content: bytes | None = None  # regular (git) files
    lfs_oid: str | None = None  # LFS files: content in FakeHub.lfs


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    is_pr: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    status: str = "open"
    ref: str | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: str | bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    discussions: list[Discussion] = field(default_factory=list)
    granted: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


def _blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeHub:
    """The Hub's state, and the app that serves it."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranged: list[str] = []  # paths of the GETs that asked for a byte range (header reads)
        self.faults: list[Fault] = []
        #: Trusted publishing: (GitHub's id token, resource) -> the Hub token the exchange returns.
        self.trusted: dict[tuple[str, str], str] = {}
        #: The request token GitHub Actions gives a job with `id-token: write`, and the id token it mints.
        self.actions_oidc: tuple[str, str] | None = None
        self.url = ""
        #: Bytes per second for file downloads and LFS uploads, each way (benchmarks/run_bench.py); None: no limit.
        self.bandwidth: float | None = None
        self._link_free: dict[str, float] = {}  # when each way of the link is free again
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self.app = self._build_app()

    # -- seeding

    def add_user(self, token: str, name: str, *, orgs: tuple[str, ...] = (), role: str = "write") -> None:
        self.users[token] = User(name, orgs, role)

    def seed(self, repo_id: str, folder: Path, *, private: bool = False, gated: str | bool = False,
             tags: tuple[str, ...] = (), message: str = "Upload model") -> str:  # fmt: skip
        """Create ``repo_id`` holding ``folder``'s files in one commit; returns the commit SHA."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
            files = {}
            for path in sorted(folder.rglob("*")):
                if path.is_file() and ".cache" not in path.parts:
                    files[path.relative_to(folder).as_posix()] = self._store(path.relative_to(folder).name,
                                                                             path.read_bytes())  # fmt: skip
            oid = self._commit(repo, "main", files, message, "", "seed", replace=True)
            for tag in tags:
                repo.tags[tag] = oid
            return oid

    def _store(self, name: str, data: bytes) -> StoredFile:
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            self.lfs[sha] = data
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            return StoredFile(size=len(data), blob_oid=_blob_oid(pointer), lfs_oid=sha)
        return StoredFile(size=len(data), blob_oid=_blob_oid(data), content=data)

    def _commit(self, repo: Repo, branch: str | None, files: dict[str, StoredFile], title: str, message: str,
                author: str, *, replace: bool = False, parent: str | None = None) -> str:  # fmt: skip
        parent = parent if parent is not None else (repo.branches.get(branch) if branch else None)
        merged = dict(files) if replace or parent is None else {**repo.commits[parent].files, **files}
        oid = hashlib.sha1(f"{repo.repo_id}{next(self._counter)}{title}{time.time()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, merged, title, message, author, _now())
        if branch:
            repo.branches[branch] = oid
        return oid

    # -- reading state (for assertions)

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        repo = self.repos[repo_id]
        stored = repo.commits[self._resolve(repo, revision) or ""].files[path]
        return stored.content if stored.content is not None else self.lfs[stored.lfs_oid or ""]

    def commit_list(self, repo_id: str, branch: str = "main") -> list[Commit]:
        repo = self.repos[repo_id]
        out, oid = [], repo.branches.get(branch)
        while oid:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    # -- helpers

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self.faults):
                if fault.method == method and fault.path_part in path:
                    return self.faults.pop(i)
        return None

    def _drop_unreferenced(self) -> None:
        """Forget LFS blobs no commit of any repo references (the benchmark deletes repos to bound memory)."""
        kept = {f.lfs_oid for r in self.repos.values() for c in r.commits.values() for f in c.files.values()}
        for oid in [o for o in self.lfs if o not in kept]:
            del self.lfs[oid]

    async def _repo_request(self, request: Request) -> tuple[User, dict[str, Any], str] | Response:
        """The user, JSON body and repo id of a repo creation or deletion (``name`` + ``organization``)."""
        user = self._user(request)
        if user is None or isinstance(user, Response):
            return user or Response(status_code=401)
        body = await request.json()
        return user, body, f"{body.get('organization') or user.name}/{body['name']}"

    def _user(self, request: Request) -> User | Response | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        token = header[7:].strip()
        user = self.users.get(token)
        if user is None:
            return Response(status_code=401, headers=_INVALID_TOKEN)
        return user

    def _resolve(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/pr/") and revision[8:].isdigit():
            return repo.prs.get(int(revision[8:]))
        if revision in repo.commits:
            return revision
        return None

    def _repo(self, request: Request, repo_id: str, *, write: bool = False) -> tuple[Repo, User | None] | Response:
        user = self._user(request)
        if isinstance(user, Response):
            return user
        repo = self.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (user is not None and self._member(user, repo.namespace)))
        if repo is None or not visible:
            code = 401 if user is None else 404
            return Response(status_code=code, headers={"X-Error-Code": "RepoNotFound",
                                                        "X-Error-Message": "Repository not found"})  # fmt: skip
        if write and (user is None or not self._member(user, repo.namespace) or user.role == "read"):
            denied = "You don't have the rights to write to this repo"
            return JSONResponse({"error": denied}, status_code=403, headers={"X-Error-Message": denied})
        return repo, user

    def _repo_at(self, request: Request, repo_id: str, revision: str) -> tuple[Repo, User | None, str] | Response:
        """The repo (visible to the caller) and the commit a revision names, or the error response."""
        found = self._repo(request, repo_id)
        if isinstance(found, Response):
            return found
        repo, user = found
        oid = self._resolve(repo, revision)
        if oid is None:
            return Response(status_code=404, headers={"X-Error-Code": "RevisionNotFound",
                                                       "X-Error-Message": "Invalid rev id"})  # fmt: skip
        return repo, user, oid

    @staticmethod
    def _member(user: User, namespace: str) -> bool:
        return namespace == user.name or namespace in user.orgs

    def _gate(self, repo: Repo, user: User | None) -> Response | None:
        if repo.gated and (user is None or (user.name not in repo.granted and not self._member(user, repo.namespace))):
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"}
            return Response(status_code=401 if user is None else 403, headers=headers)
        return None

    async def _paced(self, data: bytes, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        """``data`` in chunks, all downloads together at ``bandwidth`` bytes per second."""
        for offset in range(0, len(data), chunk):
            yield data[offset : offset + chunk]
            await self._take("down", min(chunk, len(data) - offset))

    async def _paced_body(self, request: Request) -> bytes:
        """A request body, all uploads together at ``bandwidth`` bytes per second."""
        parts = []
        async for part in request.stream():
            parts.append(part)
            await self._take("up", len(part))
        return b"".join(parts)

    async def _take(self, way: str, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit in the link one way (shared by every connection)."""
        assert self.bandwidth is not None
        with self._lock:
            start = max(time.monotonic(), self._link_free.get(way, 0.0))
            self._link_free[way] = start + nbytes / self.bandwidth
            until = self._link_free[way]
        await asyncio.sleep(max(0.0, until - time.monotonic()))

    def _card_data(self, commit: Commit) -> dict[str, Any] | None:
        stored = commit.files.get("README.md")
        if stored is None or stored.content is None:
            return None
        text = stored.content.decode()
        if not text.startswith("---"):
            return None
        import yaml

        end = text.find("\n---", 3)
        data = yaml.safe_load(text[3:end]) if end != -1 else None
        return data if isinstance(data, dict) else None

    # -- the app

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def log(request: Request, call_next: Any) -> Any:
            hub.requests.append((request.method, request.url.path))
            fault = hub._take_fault(request.method, request.url.path)
            if fault is None:
                return await call_next(request)
            await request.body()  # the whole request first: a hook that kills the client must not cut it short
            if fault.action == "lost-reply":  # carried out before the hook: once the client is killed, Starlette
                reply = await call_next(request)  # may cancel a request whose connection is gone
                _ = [chunk async for chunk in reply.body_iterator]
                if fault.hook is not None:
                    fault.hook()
                return JSONResponse({"error": "A commit has happened since. Please refresh and try again."}, 412)
            if fault.hook is not None:
                fault.hook()
            if fault.action == "drop":  # declares 1000 bytes, sends 2: the client sees the connection break
                return Response(b"{}", headers={"content-length": "1000"}, media_type="application/json")
            if fault.action == "bad-json":
                return Response(b"{not json", media_type="application/json")
            if fault.action == "pass":
                return await call_next(request)
            if fault.action == "error-500":
                message = "Internal Error - We're working hard to fix this as soon as possible!"
                return JSONResponse({"error": message + "\n" + "trace: " + "x" * 500}, 500,
                                    headers={"X-Error-Message": message, "X-Request-Id": "Root=1-abc"})  # fmt: skip
            if fault.action in ("no-id", "no-sha"):
                reply = await call_next(request)
                body = json.loads(b"".join([chunk async for chunk in reply.body_iterator]))
                body.pop(fault.action[3:], None)
                return JSONResponse(body, reply.status_code)
            raise AssertionError(f"unknown fault action {fault.action!r}")

        @app.get("/_actions/id-token")  # GitHub Actions' ACTIONS_ID_TOKEN_REQUEST_URL, served here for tests
        def mint_id_token(request: Request) -> Any:
            expected = hub.actions_oidc
            if expected is None or request.headers.get("authorization") != f"Bearer {expected[0]}":
                return JSONResponse({"message": "Bad credentials"}, 401)
            return {"value": expected[1]}

        @app.post("/oauth/token")  # RFC 8693 token exchange (Trusted Publishers)
        async def exchange(request: Request) -> Any:
            body = await request.json()
            token = hub.trusted.get((body.get("subject_token"), body.get("resource")))
            if token is None:
                return JSONResponse(
                    {"error": "invalid_grant", "error_description": "No trusted publisher matches this token"}, 400,
                    headers={"X-Error-Message": "No trusted publisher matches this token"},
                )  # fmt: skip
            return {"access_token": token, "token_type": "bearer", "expires_in": 3600}

        @app.get("/api/whoami-v2")
        def whoami(request: Request) -> Any:
            user = hub._user(request)
            if user is None:
                return Response(
                    status_code=401, headers={"X-Error-Message": "Invalid credentials in Authorization header"}
                )
            if isinstance(user, Response):
                return user
            return {
                "type": "user",
                "name": user.name,
                "orgs": [{"name": o} for o in user.orgs],
                "auth": {"type": "access_token", "accessToken": {"role": user.role, "displayName": "test"}},
            }

        def model_info(request: Request, ns: str, name: str, revision: str) -> Any:
            found = hub._repo_at(request, f"{ns}/{name}", revision)
            if isinstance(found, Response):
                return found
            repo, _, oid = found
            commit = repo.commits[oid]
            return {"id": repo.repo_id, "sha": oid, "private": repo.private, "gated": repo.gated,
                    "lastModified": commit.date, "tags": [], "cardData": hub._card_data(commit),
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)]}  # fmt: skip

        @app.get("/api/models/{ns}/{name}")
        def info_main(request: Request, ns: str, name: str) -> Any:
            return model_info(request, ns, name, "main")

        @app.get("/api/models/{ns}/{name}/revision/{revision:path}")
        def info_revision(request: Request, ns: str, name: str, revision: str) -> Any:
            return model_info(request, ns, name, revision)

        @app.get("/api/models/{ns}/{name}/tree/{revision}")
        @app.get("/api/models/{ns}/{name}/tree/{revision}/{path:path}")
        def tree(request: Request, ns: str, name: str, revision: str, path: str = "") -> Any:
            found = hub._repo_at(request, f"{ns}/{name}", revision)
            if isinstance(found, Response):
                return found
            repo, _, oid = found
            entries = []
            for file_path, stored in sorted(repo.commits[oid].files.items()):
                if path and not file_path.startswith(path.rstrip("/") + "/"):
                    continue
                entry: dict[str, Any] = {"type": "file", "oid": stored.blob_oid, "size": stored.size, "path": file_path}
                if stored.lfs_oid:
                    entry["lfs"] = {"oid": stored.lfs_oid, "size": stored.size, "pointerSize": 134}
                entries.append(entry)
            return entries

        @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        def resolve(request: Request, ns: str, name: str, revision: str, path: str) -> Any:
            found = hub._repo_at(request, f"{ns}/{name}", revision)
            if isinstance(found, Response):
                return found
            repo, user, oid = found
            denied = hub._gate(repo, user)
            if denied is not None:
                return denied
            stored = repo.commits[oid].files.get(path)
            if stored is None:
                return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid})
            headers = {"X-Repo-Commit": oid, "ETag": f'"{stored.lfs_oid or stored.blob_oid}"',
                       "Content-Length": str(stored.size)}  # fmt: skip
            if stored.lfs_oid:
                headers["X-Linked-Etag"] = f'"{stored.lfs_oid}"'
                headers["X-Linked-Size"] = str(stored.size)
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            data = stored.content if stored.content is not None else hub.lfs[stored.lfs_oid or ""]
            status = 200
            ranged = _byte_range(request.headers.get("range"), len(data))
            if ranged is not None:  # what get_safetensors_metadata and resumed downloads ask for
                hub.ranged.append(request.url.path)
                start, stop = ranged
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                headers["Content-Length"] = str(stop - start)
                data, status = data[start:stop], 206
            if hub.bandwidth is not None:
                return StreamingResponse(hub._paced(data), status_code=status, headers=headers,
                                         media_type="application/octet-stream")  # fmt: skip
            return Response(content=data, status_code=status, headers=headers, media_type="application/octet-stream")

        @app.get("/api/models/{ns}/{name}/refs")
        def refs(request: Request, ns: str, name: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}")
            if isinstance(found, Response):
                return found
            repo, _ = found

            def ref(kind: str, items: dict[Any, str]) -> list[dict[str, str]]:
                return [{"name": str(k), "ref": f"refs/{kind}/{k}", "targetCommit": v} for k, v in items.items()]

            return {"branches": ref("heads", repo.branches), "tags": ref("tags", repo.tags), "converts": [],
                    "pullRequests": ref("pr", repo.prs)}  # fmt: skip

        @app.get("/api/models/{ns}/{name}/commits/{revision}")
        def commits(request: Request, ns: str, name: str, revision: str) -> Any:
            found = hub._repo_at(request, f"{ns}/{name}", revision)
            if isinstance(found, Response):
                return found
            repo, _, oid = found
            out: list[dict[str, Any]] = []
            current: str | None = oid
            while current:
                c = repo.commits[current]
                out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                            "authors": [{"user": c.author}]})  # fmt: skip
                current = c.parent
            return out

        @app.post("/api/repos/create")
        async def create(request: Request) -> Any:
            asked = await hub._repo_request(request)
            if isinstance(asked, Response):
                return asked
            user, body, repo_id = asked
            namespace = repo_id.split("/")[0]
            url = f"{hub.url}/{repo_id}"
            with hub._lock:
                if repo_id in hub.repos:
                    return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
                if not hub._member(user, namespace) or user.role == "read":
                    return JSONResponse({"error": "You don't have the rights to create a model under this namespace"},
                                        status_code=403)  # fmt: skip
                repo = hub.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private"
                                                 or bool(body.get("private")))  # fmt: skip
                attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                hub._commit(repo, "main", {".gitattributes": hub._store(".gitattributes", attributes)},
                            "initial commit", "", user.name)  # fmt: skip
            return {"url": url}

        @app.delete("/api/repos/delete")
        async def delete(request: Request) -> Any:
            asked = await hub._repo_request(request)
            if isinstance(asked, Response):
                return asked
            user, _, repo_id = asked
            with hub._lock:
                if repo_id not in hub.repos:
                    return Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})
                if not hub._member(user, repo_id.split("/")[0]) or user.role == "read":
                    return JSONResponse({"error": "You don't have the rights to delete this repo"}, status_code=403)
                del hub.repos[repo_id]
                hub._drop_unreferenced()
            return {}

        @app.put("/api/models/{ns}/{name}/settings")
        async def settings(request: Request, ns: str, name: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}", write=True)
            if isinstance(found, Response):
                return found
            repo, _ = found
            body = await request.json()
            if "gated" in body:
                repo.gated = body["gated"]
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
            return {}

        @app.post("/api/models/{ns}/{name}/preupload/{revision}")
        async def preupload(request: Request, ns: str, name: str, revision: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}", write=True)
            if isinstance(found, Response):
                return found
            repo, _ = found
            head = repo.commits.get(hub._resolve(repo, revision) or "")
            files = []
            for f in (await request.json())["files"]:
                existing = head.files.get(f["path"]) if head else None
                mode = "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"
                oid = existing.lfs_oid or existing.blob_oid if existing else None
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return {"files": files}

        @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(request: Request, ns: str, name: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}", write=True)
            if isinstance(found, Response):
                return found
            body = await request.json()
            objects = []
            for obj in body["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"}}  # fmt: skip
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        @app.put("/lfs-upload/{oid}")
        async def lfs_upload(request: Request, oid: str) -> Any:
            data = await request.body() if hub.bandwidth is None else await hub._paced_body(request)
            if hashlib.sha256(data).hexdigest() != oid:
                return JSONResponse({"error": "sha256 mismatch"}, status_code=400)
            hub.lfs[oid] = data
            return Response(status_code=200)

        @app.post("/lfs-verify/{oid}")
        async def lfs_verify(request: Request, oid: str) -> Any:
            body = await request.json()
            ok = oid in hub.lfs and len(hub.lfs[oid]) == body["size"]
            return JSONResponse({"oid": oid, "size": body["size"]}, status_code=200 if ok else 404)

        @app.post("/api/models/{ns}/{name}/commit/{revision}")
        async def commit(request: Request, ns: str, name: str, revision: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}", write=True)
            if isinstance(found, Response):
                return found
            repo, user = found
            assert user is not None
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            changes: dict[str, StoredFile] = {}
            deleted = []
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    changes[value["path"]] = hub._store(value["path"].rsplit("/", 1)[-1], data)
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return JSONResponse({"error": f"LFS object {value['oid']} not uploaded"}, status_code=422)
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\n".encode()
                    changes[value["path"]] = StoredFile(size=len(hub.lfs[value["oid"]]), blob_oid=_blob_oid(pointer),
                                                        lfs_oid=value["oid"])  # fmt: skip
                elif item["key"] == "deletedFile":
                    deleted.append(value["path"])
            with hub._lock:
                head = hub._resolve(repo, revision)
                if head is None:
                    return Response(status_code=404, headers={"X-Error-Code": "RevisionNotFound"})
                parent = header.get("parentCommit")
                if parent and parent != head:
                    return JSONResponse({"error": "A commit has happened since. Please refresh and try again."},
                                        status_code=412)  # fmt: skip
                create_pr = request.query_params.get("create_pr") == "1"
                files = {p: f for p, f in {**repo.commits[head].files, **changes}.items() if p not in deleted}
                oid = hub._commit(repo, None if create_pr else revision, files, header["summary"],
                                  header.get("description") or "", user.name, replace=True, parent=head)  # fmt: skip
                result = {"commitOid": oid, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}"}
                if create_pr:
                    num = len(repo.discussions) + 1
                    repo.prs[num] = oid
                    repo.discussions.append(Discussion(num, header["summary"], user.name, True, ref=f"refs/pr/{num}"))
                    result["pullRequestUrl"] = f"{hub.url}/{repo.repo_id}/discussions/{num}"
            return result

        @app.post("/api/models/{ns}/{name}/tag/{revision}")
        async def tag(request: Request, ns: str, name: str, revision: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}", write=True)
            if isinstance(found, Response):
                return found
            repo, _ = found
            body = await request.json()
            if body["tag"] in repo.tags:
                return JSONResponse({"error": "Tag already exists"}, status_code=409)
            oid = hub._resolve(repo, revision)
            if oid is None:
                return Response(status_code=404, headers={"X-Error-Code": "RevisionNotFound"})
            repo.tags[body["tag"]] = oid
            return {}

        def discussion_json(repo: Repo, d: Discussion) -> dict[str, Any]:
            return {"num": d.num, "title": d.title, "status": d.status, "isPullRequest": d.is_pr,
                    "createdAt": _now(), "author": {"name": d.author}, "repo": {"name": repo.repo_id, "type": "model"},
                    "pinned": False, "numComments": len(d.events)}  # fmt: skip

        @app.get("/api/models/{ns}/{name}/discussions")
        def discussions(request: Request, ns: str, name: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}")
            if isinstance(found, Response):
                return found
            repo, _ = found
            kind = request.query_params.get("type", "all")
            status = request.query_params.get("status", "all")
            items = [
                d
                for d in repo.discussions
                if (kind == "all" or (kind == "pull_request") == d.is_pr) and status in ("all", d.status)
            ]
            return {"discussions": [discussion_json(repo, d) for d in items], "count": len(items), "start": 0}

        @app.post("/api/models/{ns}/{name}/discussions")
        async def new_discussion(request: Request, ns: str, name: str) -> Any:
            found = hub._repo(request, f"{ns}/{name}")
            if isinstance(found, Response):
                return found
            repo, user = found
            if user is None:
                return Response(status_code=401)
            body = await request.json()
            with hub._lock:
                d = Discussion(len(repo.discussions) + 1, body["title"], user.name, bool(body.get("pullRequest")))
                if body.get("description"):
                    d.events.append(event(user.name, body["description"]))
                repo.discussions.append(d)
            return {"num": d.num}

        def event(author: str, text: str) -> dict[str, Any]:
            return {"id": hashlib.sha1(f"{text}{time.time()}".encode()).hexdigest()[:24], "type": "comment",
                    "createdAt": _now(), "author": {"name": author},
                    "data": {"edited": False, "hidden": False, "latest": {"raw": text, "html": text}}}  # fmt: skip

        @app.get("/api/models/{ns}/{name}/discussions/{num}")
        def discussion(request: Request, ns: str, name: str, num: int) -> Any:
            found = hub._repo(request, f"{ns}/{name}")
            if isinstance(found, Response):
                return found
            repo, _ = found
            d = next((d for d in repo.discussions if d.num == num), None)
            if d is None:
                return Response(status_code=404)
            data = {**discussion_json(repo, d), "events": d.events}
            if d.is_pr:
                data.update({"changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": ""})
            return data

        @app.post("/api/models/{ns}/{name}/discussions/{num}/comment")
        async def comment(request: Request, ns: str, name: str, num: int) -> Any:
            found = hub._repo(request, f"{ns}/{name}")
            if isinstance(found, Response):
                return found
            repo, user = found
            if user is None:
                return Response(status_code=401)
            d = next((d for d in repo.discussions if d.num == num), None)
            if d is None:
                return Response(status_code=404)
            new = event(user.name, (await request.json())["comment"])
            d.events.append(new)
            return {"newMessage": new}

        @app.post("/api/validate-yaml")
        def validate_yaml() -> Any:
            return {"errors": [], "warnings": []}

        @app.post("/api/jobs/{namespace}")
        async def run_job(request: Request, namespace: str) -> Any:
            user = hub._user(request)
            if user is None or isinstance(user, Response):
                return user or Response(status_code=401)
            body = await request.json()
            job_id = hashlib.sha1(f"{namespace}{time.time()}{len(hub.jobs)}".encode()).hexdigest()[:24]
            job = {"id": job_id, "createdAt": _now(), "dockerImage": body.get("dockerImage"),
                   "spaceId": body.get("spaceId"), "command": body.get("command"), "arguments": body.get("arguments"),
                   "environment": body.get("environment") or {}, "secrets": sorted(body.get("secrets") or {}),
                   "flavor": body.get("flavor"), "status": {"stage": "RUNNING", "message": None},
                   "owner": {"id": "1", "name": namespace, "type": "user"}}  # fmt: skip
            hub.jobs[job_id] = {**job, "_secrets": body.get("secrets") or {}}
            return job

        return app


@dataclass
class RunningHub:
    hub: FakeHub
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.hub.url


def serve(app: Any, config: uvicorn.Config | None = None) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Run an ASGI app on 127.0.0.1 (a free port) in a thread, with uvicorn ``config`` if given; returns its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = config or uvicorn.Config(app, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, thread


def start_hub() -> RunningHub:
    hub = FakeHub()
    url, server, thread = serve(hub.app)
    hub.url = url
    return RunningHub(hub, server, thread)


def stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=5)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` -> [start, stop), clipped to the data; None for no (or another) range."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    start = int(first) if first else max(0, size - int(last))
    stop = min(size, int(last) + 1) if first and last else size
    return (start, max(start, stop))


def iter_files(folder: Path) -> Iterator[str]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix()
