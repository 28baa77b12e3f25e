"""A local GitHub REST API for tests: the real PyGithub client talks to it over HTTP.

Just what loraship uses: repositories, commits and commit statuses, releases (with assets),
repository dispatches and workflow dispatches. URLs it returns carry its own host and port, as
PyGithub requires. Every request is logged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@dataclass
class FakeGitHub:
    token: str
    url: str = ""
    statuses: list[dict[str, Any]] = field(default_factory=list)
    releases: dict[int, dict[str, Any]] = field(default_factory=dict)
    assets: dict[int, dict[str, Any]] = field(default_factory=dict)
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    workflows: dict[str, int] = field(default_factory=lambda: {"merge.yml": 7})
    requests: list[tuple[str, str]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def app(self) -> FastAPI:
        app = FastAPI()
        gh = self

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Any:
            gh.requests.append((request.method, request.url.path))
            header = request.headers.get("authorization", "")
            if header.split(" ", 1)[-1] != gh.token:
                return JSONResponse({"message": "Bad credentials"}, status_code=401)
            return await call_next(request)

        def repo_json(owner: str, repo: str) -> dict[str, Any]:
            return {"id": 1, "name": repo, "full_name": f"{owner}/{repo}", "private": False,
                    "owner": {"login": owner, "id": 1, "type": "User"}, "url": f"{gh.url}/repos/{owner}/{repo}",
                    "html_url": f"https://github.test/{owner}/{repo}"}  # fmt: skip

        @app.get("/repos/{owner}/{repo}")
        def get_repo(owner: str, repo: str) -> Any:
            return repo_json(owner, repo)

        @app.get("/repos/{owner}/{repo}/commits/{sha}")
        def get_commit(owner: str, repo: str, sha: str) -> Any:
            return {"sha": sha, "url": f"{gh.url}/repos/{owner}/{repo}/commits/{sha}", "commit": {"message": "x"}}

        @app.post("/repos/{owner}/{repo}/statuses/{sha}")
        async def create_status(request: Request, owner: str, repo: str, sha: str) -> Any:
            status = {"id": next(gh._ids), "sha": sha, **(await request.json())}
            gh.statuses.append(status)
            return JSONResponse({**status, "url": f"{gh.url}/repos/{owner}/{repo}/statuses/{sha}"}, status_code=201)

        def release_json(owner: str, repo: str, release: dict[str, Any]) -> dict[str, Any]:
            rid = release["id"]
            base = f"{gh.url}/repos/{owner}/{repo}/releases/{rid}"
            return {**release, "url": base, "assets_url": f"{base}/assets",
                    "html_url": f"https://github.test/{owner}/{repo}/releases/tag/{release['tag_name']}",
                    "upload_url": f"{gh.url}/uploads/repos/{owner}/{repo}/releases/{rid}/assets{{?name,label}}",
                    "draft": False, "prerelease": False, "created_at": "2026-11-24T00:00:00Z",
                    "author": {"login": "bot", "id": 2}}  # fmt: skip

        @app.get("/repos/{owner}/{repo}/releases/tags/{tag}")
        def release_by_tag(owner: str, repo: str, tag: str) -> Any:
            for release in gh.releases.values():
                if release["tag_name"] == tag:
                    return release_json(owner, repo, release)
            return JSONResponse({"message": "Not Found"}, status_code=404)

        @app.post("/repos/{owner}/{repo}/releases")
        async def create_release(request: Request, owner: str, repo: str) -> Any:
            body = await request.json()
            release = {"id": next(gh._ids), "tag_name": body["tag_name"], "name": body.get("name"),
                       "body": body.get("body")}  # fmt: skip
            gh.releases[release["id"]] = release
            return JSONResponse(release_json(owner, repo, release), status_code=201)

        @app.patch("/repos/{owner}/{repo}/releases/{rid}")
        async def update_release(request: Request, owner: str, repo: str, rid: int) -> Any:
            body = await request.json()
            gh.releases[rid].update({k: v for k, v in body.items() if k in ("name", "body", "tag_name")})
            return release_json(owner, repo, gh.releases[rid])

        def asset_json(owner: str, repo: str, asset: dict[str, Any]) -> dict[str, Any]:
            return {
                **{k: v for k, v in asset.items() if k != "data"},
                "size": len(asset["data"]),
                "state": "uploaded",
                "url": f"{gh.url}/repos/{owner}/{repo}/releases/assets/{asset['id']}",
                "browser_download_url": f"https://github.test/{owner}/{repo}/releases/download/{asset['name']}",
            }

        @app.get("/repos/{owner}/{repo}/releases/{rid}/assets")
        def list_assets(owner: str, repo: str, rid: int) -> Any:
            return [asset_json(owner, repo, a) for a in gh.assets.values() if a["release"] == rid]

        @app.delete("/repos/{owner}/{repo}/releases/assets/{aid}")
        def delete_asset(owner: str, repo: str, aid: int) -> Any:
            gh.assets.pop(aid, None)
            return Response(status_code=204)

        @app.post("/uploads/repos/{owner}/{repo}/releases/{rid}/assets")
        async def upload_asset(request: Request, owner: str, repo: str, rid: int) -> Any:
            asset = {"id": next(gh._ids), "release": rid, "name": request.query_params["name"],
                     "content_type": request.headers.get("content-type"), "data": await request.body()}  # fmt: skip
            gh.assets[asset["id"]] = asset
            return JSONResponse(asset_json(owner, repo, asset), status_code=201)

        @app.post("/repos/{owner}/{repo}/dispatches")
        async def repository_dispatch(request: Request, owner: str, repo: str) -> Any:
            gh.dispatches.append({"kind": "repository", "repo": f"{owner}/{repo}", **(await request.json())})
            return Response(status_code=204)

        @app.get("/repos/{owner}/{repo}/actions/workflows/{workflow}")
        def get_workflow(owner: str, repo: str, workflow: str) -> Any:
            wid = gh.workflows.get(workflow)
            if wid is None:
                return JSONResponse({"message": "Not Found"}, status_code=404)
            url = f"{gh.url}/repos/{owner}/{repo}/actions/workflows/{wid}"
            return {
                "id": wid,
                "name": workflow,
                "path": f".github/workflows/{workflow}",
                "state": "active",
                "url": url,
                "html_url": f"https://github.test/{owner}/{repo}/actions/workflows/{workflow}",
            }

        @app.post("/repos/{owner}/{repo}/actions/workflows/{wid}/dispatches")
        async def workflow_dispatch(request: Request, owner: str, repo: str, wid: int) -> Any:
            gh.dispatches.append({"kind": "workflow", "repo": f"{owner}/{repo}", "workflow_id": wid,
                                  **(await request.json())})  # fmt: skip
            return Response(status_code=204)

        return app
