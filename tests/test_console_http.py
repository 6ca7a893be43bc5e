"""The console over plain HTTP against a real control plane and a real device's sync path:
nothing works without a session, sessions are HttpOnly/SameSite=Strict cookies, changes need
the CSRF token and this origin, a viewer is refused by the API, bad input and unknown ids are
clear errors, and device- or operator-written text is escaped."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud.console.app import LOGIN_FAILURES
from cloud.domain import DesiredModel
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import wait_for
from tests.support.alerting import Site, open_site
from tests.support.console import console_url, csrf_of, feed_alert, signed_in

pytestmark = pytest.mark.integration
FIRING = operator_pb2.Alert.STATE_FIRING
ACKED = operator_pb2.Alert.STATE_ACKNOWLEDGED


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with open_site(tmp_path, console_listen="127.0.0.1:0") as s:
        yield s


def test_nothing_works_without_a_session(site: Site) -> None:
    alert = feed_alert(site)
    anonymous = httpx.Client(base_url=console_url(site.plane), timeout=20)
    pages = ["/", "/fleet", "/fleet?selector=site%3Da", f"/devices/{alert.device_id}",
             "/rollouts", "/rollouts/x", "/alerts", f"/alerts/{alert.id}"]  # fmt: skip
    scripts = ["/live/rollouts", "/live/rollouts/x", "/live/alerts", "/live/alerts/watch"]
    forged = {"autoglm_console": "gAAAAABforged"}
    for cookies in ({}, forged):
        anonymous.cookies.clear()
        anonymous.cookies.update(cookies)
        for path in pages:
            response = anonymous.get(path)
            assert response.status_code in (302, 303), (path, response.status_code)
            assert response.headers["location"].startswith("/login"), path
            assert "edge-1" not in response.text and "pump-1" not in response.text
        for path in scripts:
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.json() == {"error": "sign in first"}
        for path in (f"/alerts/{alert.id}/ack", "/rollouts/x/abort", "/logout"):
            response = anonymous.post(path, data={"verdict": "true"})
            assert response.status_code in (303, 401), path
    assert [a.state for a in site.alerts()] == [FIRING]
    # The sign-in page itself, the stylesheet and the probe are public; they hold no data.
    assert anonymous.get("/login").status_code == 200
    assert anonymous.get("/static/console.js").status_code == 200
    assert anonymous.get("/healthz").json() == {"status": "serving"}


def test_sign_in_sets_a_strict_httponly_cookie_and_bad_tokens_are_refused(site: Site) -> None:
    client = httpx.Client(base_url=console_url(site.plane), timeout=20)
    for token, status in (("", 400), ("agt_op_not-a-real-one", 401), ("a b", 400)):
        response = client.post("/login", data={"token": token})
        assert response.status_code == status, token
        assert "autoglm_console" not in response.headers.get("set-cookie", "")
    assert "not a live operator token" in client.post("/login", data={"token": "agt_op_x"}).text
    # The login page's ?next= reaches the form decoded: tabs and newlines, which browsers
    # and yarl drop ("/\t/evil" would become "//evil", another site).
    for elsewhere in ("/\t/evil.example", "/\n/evil.example", "/\r/evil.example",
                      "https://evil.example/x"):  # fmt: skip
        response = client.post("/login", data={"token": site.plane.token, "next": elsewhere})
        assert response.status_code == 303, elsewhere
        assert response.headers["location"] == "/fleet", (elsewhere, response.headers)
        client.cookies.clear()
    bad_utf8 = client.post(
        "/login",
        content=b"token=\xff\xfe",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert bad_utf8.status_code == 400 and "Traceback" not in bad_utf8.text, bad_utf8.text[-300:]
    response = client.post("/login", data={"token": site.plane.token, "next": "//evil.example"})
    assert response.status_code == 303 and response.headers["location"] == "/fleet"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert site.plane.token not in response.headers["set-cookie"]  # sealed, not readable
    fleet = client.get("/fleet")
    assert fleet.status_code == 200 and "edge-1" in fleet.text and "site=a" in fleet.text
    assert "script-src 'self'" in fleet.headers["content-security-policy"]
    assert fleet.headers["x-frame-options"] == "DENY"
    # Signing out ends the session in the browser.
    client.post("/logout", data={"_csrf": csrf_of(fleet.text)})
    assert client.get("/fleet").status_code == 303


def _fleet_row(page_html: str, name: str) -> list[str]:
    """The cells of the fleet table's row of device `name`, as text."""
    for row in re.findall(r"<tr>(.*?)</tr>", page_html, re.S):
        cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name} on the fleet page")


def test_devices_show_the_model_the_plane_wants_on_them(site: Site) -> None:
    register(site.plane, "edge-2", site="b")  # never connects: nothing is pushed to it
    store = site.plane.plane.store
    edge_2 = store.get_device("edge-2")
    # As a rollout's wave writes it.
    store.set_desired(
        [
            DesiredModel(
                device_id=edge_2.id,
                model_name="pump",
                model_version="2",
                manifest_digest="sha256:" + "a" * 64,
                signature_digest="sha256:" + "b" * 64,
                rollout_id="r-1",
                shadow=False,
                updated_at=dt.datetime.now(dt.UTC),
            )
        ]
    )
    with site.plane.client() as client:
        listed = {d.name: d.desired_model_version for d in client.list_devices()}
        assert listed == {"edge-1": "", "edge-2": "pump:2"}
        assert client.get_device("edge-2").desired_model_version == "pump:2"
        assert client.label_device("edge-2", {"line": "4"}, []).desired_model_version == "pump:2"
        # A new enrollment token for an existing device (to re-enroll it) keeps its desired.
        token = client.issue_enrollment_token("edge-2")
        assert token.device.desired_model_version == "pump:2"
    console = signed_in(site.plane, site.plane.token)
    fleet = console.get("/fleet").text
    assert "<th>Desired</th>" in fleet
    # Name, State, Labels, Profile, Serving, Desired, ...
    assert _fleet_row(fleet, "edge-2")[5] == "pump:2", _fleet_row(fleet, "edge-2")
    assert _fleet_row(fleet, "edge-1")[5] == "-", _fleet_row(fleet, "edge-1")
    device = console.get(f"/devices/{edge_2.id}").text
    assert "<dt>Desired</dt><dd>pump:2</dd>" in device, device


def test_wrong_tokens_are_bounded_per_address(site: Site) -> None:
    client = httpx.Client(base_url=console_url(site.plane), timeout=20)
    for i in range(LOGIN_FAILURES):
        response = client.post("/login", data={"token": f"agt_op_guess{i}"})
        assert response.status_code == 401, (i, response.status_code)
    # Past the bound even the right token waits: guessing stops, and the page says why.
    response = client.post("/login", data={"token": site.plane.token})
    assert response.status_code == 429, response.status_code
    assert "failed sign-ins from 127.0.0.1" in response.text


def test_changes_need_the_csrf_token_and_this_origin(site: Site) -> None:
    alert = feed_alert(site)
    client = signed_in(site.plane, site.plane.token)
    page = client.get(f"/alerts/{alert.id}")
    csrf = csrf_of(page.text)
    refused = [
        client.post(f"/alerts/{alert.id}/ack", data={"verdict": "true"}),
        client.post(f"/alerts/{alert.id}/ack", data={"_csrf": "wrong", "verdict": "true"}),
        client.post(
            f"/alerts/{alert.id}/ack",
            data={"_csrf": csrf, "verdict": "true"},
            headers={"Origin": "http://evil.example"},
        ),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert [a.state for a in site.alerts()] == [FIRING]
    done = client.post(
        f"/alerts/{alert.id}/ack",
        data={"_csrf": csrf, "verdict": "true", "note": "bearing noise"},
        headers={"Origin": console_url(site.plane)},
    )
    assert done.status_code == 303 and done.headers["location"].endswith("?done=ack")
    (acked,) = site.alerts()
    assert acked.state == ACKED and acked.verdict == "true"
    assert "Acknowledged." in client.get(done.headers["location"]).text


def test_a_viewer_sees_everything_and_every_action_is_refused_by_the_api(site: Site) -> None:
    alert = feed_alert(site)
    with site.plane.client() as admin:
        viewer_token = admin.add_operator("watcher", "viewer").token
    viewer = signed_in(site.plane, viewer_token)
    page = viewer.get(f"/alerts/{alert.id}")
    assert page.status_code == 200 and "pump-1" in page.text
    csrf = csrf_of(page.text)
    for action, form in (
        ("ack", {"verdict": "true"}),
        ("resolve", {"verdict": "false"}),
        ("shelve", {"for": "1h", "reason": "noisy"}),
    ):
        response = viewer.post(f"/alerts/{alert.id}/{action}", data={"_csrf": csrf, **form})
        assert response.status_code == 403, action
        assert "Permission denied" in response.text and "needs the operator role" in response.text
    response = viewer.post("/rollouts/no-such/pause", data={"_csrf": csrf})
    assert response.status_code == 403 and "PauseRollout needs the operator role" in response.text
    assert [(a.state, a.verdict) for a in site.alerts()] == [(FIRING, "")]
    for path in ("/fleet", f"/devices/{alert.device_id}", "/rollouts", "/alerts"):
        assert viewer.get(path).status_code == 200, path


def test_bad_input_and_unknown_ids_are_clear_errors(site: Site) -> None:
    alert = feed_alert(site)
    client = signed_in(site.plane, site.plane.token)
    csrf = csrf_of(client.get("/fleet").text)
    cases = [
        (client.get("/alerts/no-such-alert"), 404, "Not found"),
        (client.get("/devices/no-such-device"), 404, "Not found"),
        (client.get("/rollouts/no-such-rollout"), 404, "Not found"),
        (client.get("/fleet?selector=%3D%3D%3D"), 400, "Refused"),
        (client.get("/alerts?state=sleeping"), 400, "not one of"),
        (client.get("/fleet?selector=" + "a" * 2000), 400, "at most 1000 characters"),
        (
            client.post(
                f"/alerts/{alert.id}/shelve", data={"_csrf": csrf, "for": "soon", "reason": "x"}
            ),
            400,
            "is not a duration",
        ),
        (
            client.post(
                f"/alerts/{alert.id}/shelve", data={"_csrf": csrf, "for": "nan", "reason": "x"}
            ),
            400,
            "must be a positive number",
        ),
        (
            client.post(f"/alerts/{alert.id}/ack", data={"_csrf": csrf, "verdict": "maybe"}),
            400,
            "verdict &#x27;maybe&#x27; is not one of",
        ),
        (client.post(f"/alerts/{alert.id}/explode", data={"_csrf": csrf}), 404, ""),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.request.url, response.text[-500:])
        assert words in response.text, (response.request.url, response.text[-800:])
        assert "Traceback" not in response.text
    assert [a.state for a in site.alerts()] == [FIRING]


def test_text_from_devices_and_operators_is_escaped(site: Site) -> None:
    alert = feed_alert(site)
    evil = '<script>window.pwned=1</script><img src=x onerror="alert(1)">'
    with site.plane.client() as admin:
        admin.alert_action("ack", alert.id, note=evil)
    client = signed_in(site.plane, site.plane.token)
    page = client.get(f"/alerts/{alert.id}").text
    assert "<script>window.pwned" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert page.count("<script") == 1  # only the console's own script file


def test_a_revoked_operator_is_signed_out_at_the_next_page(site: Site) -> None:
    with site.plane.client() as admin:
        token = admin.add_operator("leaver", "operator").token
        client = signed_in(site.plane, token)
        assert client.get("/fleet").status_code == 200
        admin.revoke_operator("leaver")
    # The API's token cache holds a good token for a few seconds at most.
    seen: list[httpx.Response] = []
    wait_for(
        lambda: seen.append(client.get("/fleet")) or seen[-1].status_code == 303,
        timeout=20,
        interval=0.5,
    )
    assert "expired=1" in seen[-1].headers["location"]  # "Your session ended; sign in again."
    assert "autoglm_console" not in client.cookies  # the dead session's cookie is dropped


@pytest.mark.e2e
def test_cloud_serve_serves_the_console_when_asked(tmp_path: Path) -> None:
    import json
    import subprocess

    from tests.test_cli_e2e import BIN, _env, autoglm

    state = tmp_path / "cloud"
    init = autoglm(tmp_path, "cloud", "init", "--state-dir", str(state), "--host", "localhost",
                   "--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0")  # fmt: skip
    token = next(w.strip() for w in init.stdout.splitlines() if w.strip().startswith("agt_op_"))
    ports_file = tmp_path / "ports.json"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "autoglm"), "cloud", "serve", "--state-dir", str(state), "--ports-file",
         str(ports_file), "--console-listen", "127.0.0.1:0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )  # fmt: skip
    try:
        wait_for(ports_file.exists, timeout=30)
        port = json.loads(ports_file.read_text())["console_port"]
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20)
        assert client.get("/fleet").status_code == 303
        assert client.post("/login", data={"token": token}).status_code == 303
        assert "No rollouts yet." in client.get("/rollouts").text
    finally:
        server.terminate()
        server.wait(30)
    assert f"console on http://127.0.0.1:{port}/" in (tmp_path / "serve.log").read_text()


def test_the_watch_stream_pushes_each_alert_change_as_its_rendered_row(site: Site) -> None:
    import json
    import threading

    alert = feed_alert(site)
    client = signed_in(site.plane, site.plane.token)
    events: list[tuple[str, str]] = []
    ready = threading.Event()

    def read() -> None:
        with client.stream("GET", "/live/alerts/watch") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, line[6:]))
                    if kind == "ready":  # the API's stream has started: nothing is missed
                        ready.set()
                    elif kind == "alert" and "acknowledged" in line:
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(60)
    with site.plane.client() as admin:
        admin.alert_action("ack", alert.id, note="<b>seen</b>", verdict="unsure")
    reader.join(60)
    assert not reader.is_alive(), events
    kind, data = events[-1]
    doc = json.loads(data)
    assert kind == "alert" and doc["id"] == alert.id
    assert f'data-alert-id="{alert.id}"' in doc["row"] and "acknowledged" in doc["row"]
    assert "unsure" in doc["row"]
