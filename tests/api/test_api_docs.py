"""``/docs`` works on an air-gapped network: the page and every asset it references come from
the node itself (a real uvicorn server), the page loads nothing from elsewhere, and the
assets are packaged with the wheel."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import tomllib

from tests.api_support import serving, shared_world
from triagenode.api.docs import DOCS_ASSETS

ROOT = Path(__file__).resolve().parents[2]


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "data-openapi-url"):
                self.urls.append(value)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    world = shared_world(tmp_path_factory.mktemp("docs"))
    with serving(world.app) as address:
        yield f"http://{address}"


def test_docs_and_every_asset_come_from_the_node(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "http" not in policy
        assert not re.search(r"(?:https?:)?//", page.text), "the page names another host"
        parser = _References()
        parser.feed(page.text)
        assert len(parser.urls) == 5  # css, icon, bundle, start-up script, OpenAPI document
        kinds = {}
        for url in parser.urls:
            assert url.startswith("/"), url
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 0
            kinds[url.rsplit(".", 1)[-1]] = asset
        assert kinds["js"].headers["content-type"].startswith(("text/javascript", "application/"))
        assert kinds["css"].headers["content-type"].startswith("text/css")
        assert kinds["json"].json()["info"]["title"] == "triagenode admin API"
        bundle = client.get("/docs/static/swagger-ui-bundle.js").text
        assert "SwaggerUIBundle" in bundle
        start = client.get("/docs/static/triagenode-docs.js").text
        assert "validatorUrl: null" in start  # no badge fetched from validator.swagger.io
        css = kinds["css"].text
        assert all(u.startswith(("data:", '"data:')) for u in re.findall(r"url\(([^)]*)", css))
        # nothing outside the assets folder is served
        assert client.get("/docs/static/..%2fdocs.py").status_code == 404


def test_assets_are_packaged_with_their_license() -> None:
    names = {p.name for p in DOCS_ASSETS.iterdir()}
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"} <= names
    assert "Apache License" in (DOCS_ASSETS / "LICENSE").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["triagenode"]
    package = ROOT / "src" / "triagenode"
    for asset in DOCS_ASSETS.iterdir():
        relative = asset.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
