"""The web chat page's files, fast: `/` serves the page, its assets serve with the right types, nothing in
them points outside the server, and the Markdown renderer escapes model text (run in Node.js where it is
installed). The page in a real browser against a real server: tests/test_web_browser.py."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from tokenmill.entrypoints.openai.api_server import STATIC_DIR

ROOT = Path(__file__).resolve().parents[1]
# An XML namespace name: an identifier that is never fetched (an inline SVG needs it).
ALLOWED_URLS = {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def responses(tiny_model_dir) -> dict[str, httpx.Response]:
    """GET of the page, of every file under static/, and of a missing asset, through the real app."""
    from tokenmill.entrypoints.openai import build_app

    app = build_app(model=str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=64)
    paths = ["/", "/static/no-such-file.js"] + [f"/static/{p.name}" for p in sorted(STATIC_DIR.iterdir())]

    async def main() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return {path: await client.get(path) for path in paths}

    return asyncio.run(main())


def test_root_serves_the_page(responses):
    r = responses["/"]
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.text == (STATIC_DIR / "index.html").read_text()
    assert '<meta name="viewport" content="width=device-width' in r.text  # phone-width layout
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp


def test_assets_serve_with_their_types(responses):
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}
    for path in sorted(STATIC_DIR.iterdir()):
        r = responses[f"/static/{path.name}"]
        assert r.status_code == 200, path
        assert r.headers["content-type"].split(";")[0] == types[path.suffix], (path, r.headers)
        assert r.content == path.read_bytes()
    missing = responses["/static/no-such-file.js"]
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_page_references_only_its_own_server():
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert refs and all(ref.startswith("static/") and (STATIC_DIR / ref[7:]).is_file() for ref in refs), refs
    for path in sorted(STATIC_DIR.iterdir()):
        text = path.read_text()
        urls = set(re.findall(r"""(?:https?:)?//[\w.-]+\.\w+[^\s"'<>)]*""", text)) - ALLOWED_URLS
        # JS comments start "// " with a space; anything that reads like //host.tld is a reference.
        assert not urls, (path.name, urls)
        assert "@import" not in text and "url(" not in text.replace("url(#", ""), path.name
    js = (STATIC_DIR / "chat.js").read_text()
    fetched = re.findall(r"""fetch\(\s*["'`]([^"'`]+)""", js)
    assert sorted(set(fetched)) == ["v1/chat/completions", "v1/models"], fetched
    assert '"Content-Type": "application/json"' in js  # the server's Content-Type checks need it


def test_script_and_page_agree_on_element_ids():
    """Every element the script looks up exists in the page (a renamed id would break the page silently)."""
    html = (STATIC_DIR / "index.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    wanted = set(re.findall(r"""\$\("([^"]+)"\)""", (STATIC_DIR / "chat.js").read_text()))
    assert wanted and wanted <= ids, wanted - ids


def test_static_files_are_package_data():
    """A wheel (not only this checkout) carries the page: pyproject's package-data globs cover each file."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["tokenmill"]
    package = ROOT / "tokenmill"
    for path in STATIC_DIR.iterdir():
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


# ---- the Markdown renderer, in Node.js ---------------------------------------------------------------------
MARKDOWN_CASES = {
    "hostile": "<script>alert(1)</script> <img src=x onerror=alert(1)> [a](javascript:alert(1)) \"q\" 'q' &amp;",
    "inline": "Hello **bold**, *it*, ***both***, `a<b`, ~~gone~~, snake_case and 2*3*4",
    "code": "Run:\n```python\nif a < b and c > d:\n    print('<b>')\n```\ndone",
    "unclosed": "```js\nlet x = '<i>'",
    "lists": "1. one\n2. two\n   - sub <a>\n   - sub b\n3. three\n\n- x\n- y",
    "blocks": "# Title\n> quoted **b**\n\n---\n| a | b |\n|---|---|\n| 1 | <2> |",
    "lang": '```"><img src=x onerror=alert(1)>\ncode\n```',
}
EXPECTED = {
    "hostile": "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt; "
    "[a](javascript:alert(1)) &quot;q&quot; &#39;q&#39; &amp;amp;</p>",
    "inline": "<p>Hello <strong>bold</strong>, <em>it</em>, <strong><em>both</em></strong>, <code>a&lt;b</code>, "
    "<del>gone</del>, snake_case and 2*3*4</p>",
    "lists": "<ol><li>one</li><li>two<ul><li>sub &lt;a&gt;</li><li>sub b</li></ul></li><li>three</li></ol>"
    "<ul><li>x</li><li>y</li></ul>",
    "blocks": "<h3>Title</h3><blockquote><p>quoted <strong>b</strong></p></blockquote><hr>"
    '<div class="table"><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td>'
    "<td>&lt;2&gt;</td></tr></tbody></table></div>",
}
# The only tags (and attributes) the renderer itself writes.
ALLOWED_TAGS = {
    "p", "br", "strong", "em", "del", "code", "pre", "div", "span", "button", "ul", "ol", "li",
    "h3", "h4", "h5", "h6", "blockquote", "hr", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRS = {"class", "type", "title", "start"}


def test_markdown_renderer_escapes_and_formats():
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed (the browser test covers the renderer too)")
    script = (
        f"const md = require({json.dumps(str(STATIC_DIR / 'markdown.js'))});"
        f"const cases = {json.dumps(MARKDOWN_CASES)};"
        "const out = {}; for (const k in cases) out[k] = md.render(cases[k]);"
        "process.stdout.write(JSON.stringify(out));"
    )
    out = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout)
    for name, expected in EXPECTED.items():
        assert out[name] == expected, name
    code = out["code"]
    assert (
        '<pre><code class="language-python">if a &lt; b and c &gt; d:\n    print(&#39;&lt;b&gt;&#39;)</code></pre>'
        in code
    )
    assert code.startswith("<p>Run:</p>") and code.endswith("<p>done</p>")
    assert '<pre><code class="language-js">let x = &#39;&lt;i&gt;&#39;</code></pre>' in out["unclosed"]
    for name, html in out.items():
        for tag, attrs in re.findall(r"<(\w+)([^>]*)>", html):
            assert tag in ALLOWED_TAGS, (name, tag)
            assert set(re.findall(r"(\w+)=", attrs)) <= ALLOWED_ATTRS, (name, attrs)
        assert "onerror=" not in re.sub(r"&lt;.*?&gt;", "", html), name
