"""The portal with SSL on, spoken to by clients other than a browser: plain http to the TLS port,
every page called with a method it does not take, and the CSRF check's reading of ``Origin``."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
from werkzeug.routing import Rule

from control.app import create_app
from control.runtime import unixhttp

from conftest import SITE_NAME, TLSStack, csrf_token

pytestmark = pytest.mark.stack

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    return answer


def test_plain_http_to_the_tls_port_is_sent_to_https(tls_stack: TLSStack) -> None:
    host = f"{SITE_NAME}:{tls_stack.web_port}"
    answer = raw_http(
        tls_stack.web_port, f"GET /query/studies?patient_id=P1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    )
    head = answer.decode("latin-1").split("\r\n")
    assert head[0].split(" ", 2)[1] == "308", head
    assert f"Location: https://{host}/query/studies?patient_id=P1" in head

    # A person's mistyped address, followed as a browser follows it, ends on the page over https.
    followed = subprocess.run(
        [
            *("curl", "-sS", "-L", "--max-time", "10", "--cacert", str(tls_stack.certificate.certificate)),
            *("--resolve", f"{host}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code} %{url_effective}"),
            f"http://{host}/login",
        ],
        capture_output=True,
        text=True,
    )
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == f"200 https://{host}/login"
    head_only = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{tls_stack.web_port}/"],
        capture_output=True,
        text=True,
    )
    assert head_only.returncode == 0, head_only.stderr
    assert f"Location: https://127.0.0.1:{tls_stack.web_port}/" in head_only.stdout


def sample_path(rule: Rule) -> str:
    """A path the rule matches, with made-up values for its variables."""

    def value(match: re.Match) -> str:
        converter, options = match.group(1), match.group(2)
        if converter == "any":
            return options.split(",")[0].strip()
        # DICOMweb's UIDs and frame numbers are the route table's converters (control.dicomweb_routes).
        return {"int": "1", "number": "1", "uid": "1.2"}.get(converter, "abc")

    return re.sub(r"<(?:(\w+)(?:\(([^)]*)\))?:)?\w+>", value, rule.rule)


def test_every_page_answers_405_to_a_method_it_does_not_take(tls_stack: TLSStack) -> None:
    app = create_app({"DATA_DIR": tls_stack.data})
    socket_path = tls_stack.data / "run" / "control.sock"
    log = tls_stack.data / "logs" / "control.log"
    logged_before = log.read_text(errors="replace")
    called = 0
    urls = app.url_map.bind("portal")
    for rule in app.url_map.iter_rules():
        path = sample_path(rule)
        # One path may be served by several rules (DICOMweb's searches and stores): a method none of
        # them takes.
        taken = urls.allowed_methods(path)
        wrong = next(method for method in METHODS if method not in taken)
        # Straight to the control plane: Caddy answers a few of these paths itself (the viewer's,
        # DICOMweb through the gate), and the control plane must answer for all of its own.
        status, body = unixhttp.request(
            socket_path,
            wrong,
            path,
            body=b"",
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": f"{SITE_NAME}:{tls_stack.web_port}"},
        )
        assert status == 405, (wrong, path, status, body[:200])
        called += 1
    assert called > 40
    # The same through the web front, as a browser or a script gets it: the portal's page or JSON.
    client = tls_stack.client()
    for method, path in (("GET", "/logout"), ("PUT", "/login"), ("POST", "/token/viewer")):
        answer = client.request(method, f"{tls_stack.url}{path}", allow_redirects=False)
        assert answer.status_code == 405, (method, path)
        assert "This address does not take that kind of request." in answer.text
        assert answer.headers["Allow"]
    scripted = client.delete(f"{tls_stack.url}/healthz")
    assert scripted.status_code == 405 and scripted.json()["status"] == 405
    added = log.read_text(errors="replace")[len(logged_before) :]
    assert "Traceback" not in added and "ERROR" not in added, added[-2000:]


@pytest.mark.parametrize("query", ["limit=-5", "offset=-1", "limit=5&limit=-1", "limit=abc", "Limit="])
def test_bad_dicomweb_paging_is_the_clients_mistake(tls_stack: TLSStack, query: str) -> None:
    signed_in = tls_stack.sign_in()
    for path in ("/dicom-web/studies", "/dicom-web/series", "/dicom-web/studies/1.2.3/series"):
        answer = signed_in.get(f"{tls_stack.url}{path}?{query}")
        assert answer.status_code == 400, (path, answer.text[:200])
        assert "whole numbers" in answer.text
    assert signed_in.get(f"{tls_stack.url}/dicom-web/studies?limit=5&offset=0").status_code == 200


def test_a_form_with_another_sites_origin_is_refused_even_with_its_token(tls_stack: TLSStack) -> None:
    client = tls_stack.client()
    token = csrf_token(client.get(f"{tls_stack.url}/login").text)
    form = {"username": "admin", "password": "not the password", "csrf_token": token}
    own = tls_stack.url
    cases = [
        ({"Origin": "https://evil.example"}, 400),
        ({"Origin": tls_stack.plain_url}, 400),  # another scheme is another origin
        ({"Origin": f"https://127.0.0.1:{tls_stack.web_port + 1}"}, 400),  # so is another port
        ({"Sec-Fetch-Site": "cross-site", "Origin": own}, 400),
        ({"Sec-Fetch-Site": "same-site", "Origin": own}, 400),
        # What a browser sends from the portal's own pages, and from the patients' (no-referrer).
        ({"Sec-Fetch-Site": "same-origin", "Origin": own}, 401),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, 401),
        ({"Origin": own}, 401),
        ({}, 401),  # scripts (the downloader) send neither: the token decides
    ]
    for headers, status in cases:
        answer = client.post(f"{tls_stack.url}/login", data=form, headers=headers)
        assert answer.status_code == status, (headers, re.findall(r"<p>(.*?)</p>", answer.text))
        if status == 400:
            assert "This form did not come from this site." in answer.text
        else:
            assert "The username or password is not correct" in answer.text
