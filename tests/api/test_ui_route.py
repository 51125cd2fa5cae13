"""The console's static files over real HTTP: open without a key (GET/HEAD of the named files
only), locked down by their headers, and nothing else opened by the exemption."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.routes.ui import STATIC_DIR, STATIC_FILES, static_files
from tests.api.adapter_http import ALICE, auth, write_keys
from tests.harness import cpu_settings, running_server


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("ui-route")
    with running_server(cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"))) as u:
        yield u


def test_page_and_assets_are_open_with_a_strict_policy(url: str) -> None:
    assert {"app.js", "api.js", "app.css", "chart.js"} <= set(STATIC_FILES)
    for path, media in [("/ui", "text/html"), *((f"/ui/static/{n}", None) for n in STATIC_FILES)]:
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 200, (path, r.text)
        assert media is None or r.headers["content-type"].startswith(media)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe" not in csp and r.headers["x-content-type-options"] == "nosniff"
    assert httpx.head(f"{url}/ui").status_code == 200
    assert httpx.get(f"{url}/ui/static/app.js").headers["content-type"].startswith("text/javascript")


def test_the_page_has_no_inline_script_and_fetches_nothing_elsewhere() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=", html) and "style=" not in html
    for path in [STATIC_DIR / "index.html", *STATIC_FILES.values()]:
        urls = set(re.findall(r"https?://[^\s\"'`)]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # an SVG namespace, never fetched


def test_unknown_asset_is_404_json(url: str) -> None:
    r = httpx.get(f"{url}/ui/static/missing.js")  # open (a file name's shape), but no such file
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("method, path", [
    ("POST", "/ui"), ("PUT", "/ui/static/app.js"), ("DELETE", "/ui"),
    ("GET", "/ui/"), ("GET", "/uix"), ("GET", "/ui/static/"), ("GET", "/ui/static/app.py"),
    ("GET", "/ui/static/a/app.js"), ("GET", "/ui/static/..%2fapp.js"), ("GET", "/ui/static/app.js/x"),
    ("GET", "/ui/../v1/adapters"), ("GET", "/v1/adapters"), ("GET", "/metrics"),
])
def test_nothing_else_is_opened(url: str, method: str, path: str) -> None:
    with httpx.Client(base_url=url) as client:
        request = client.build_request(method, "/")
        request.url = request.url.copy_with(raw_path=path.encode())  # byte for byte: no normalising of ".."
        r = client.send(request)
    assert r.status_code == 401, (method, path, r.text)
    assert httpx.get(f"{url}/v1/adapters", headers=auth(ALICE)).status_code == 200


def test_only_assets_of_known_kinds_are_served(tmp_path: Path) -> None:
    for name in ("a.js", "b.css", "c.svg", "index.html", "secret.py", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub.js").mkdir()
    assert sorted(static_files(tmp_path)) == ["a.js", "b.css", "c.svg"]
    assert static_files(tmp_path / "missing") == {}
