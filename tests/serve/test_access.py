"""Access control over real HTTP: the optional API key (Bearer, compared in constant time, 401 otherwise,
/healthz open), the Host allow-list (DNS rebinding), opt-in CORS, the docs off unless asked, and the warning
for a server reachable beyond loopback without a key."""

import hmac
import logging

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from serve_helpers import hall_json  # noqa: E402

from hkd4vlm import serve as serve_module  # noqa: E402
from hkd4vlm.cli import main  # noqa: E402
from hkd4vlm.serve import ServerThread, create_app  # noqa: E402
from hkd4vlm.serve import app as app_module  # noqa: E402

KEY = "s3cret-Key_0123456789"


@pytest.fixture(scope="module")
def keyed(detector):
    with ServerThread(create_app(detector, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def plain(detector):
    with ServerThread(create_app(detector)) as s:
        yield s


@pytest.mark.parametrize(
    "headers, why",
    [
        ({}, "missing"),
        ({"Authorization": "Bearer wrong-key"}, "not a valid API key"),
        ({"Authorization": f"Bearer {KEY}x"}, "not a valid API key"),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, "not a valid API key"),
        ({"Authorization": f"Basic {KEY}"}, "not a valid API key"),
        ({"Authorization": KEY}, "not a valid API key"),
    ],
)
def test_a_request_without_the_right_key_is_refused_with_401(keyed, hall, headers, why):
    for method, path, kw in [
        ("POST", "/v1/hallucination", {"json": hall_json(hall)}),
        ("GET", "/v1/stats", {}),
        ("GET", "/v1/model", {}),
    ]:
        got = httpx.request(method, f"{keyed.url}{path}", headers=headers, timeout=60, **kw)
        assert got.status_code == 401, (path, got.text)
        assert got.headers["www-authenticate"] == "Bearer"
        assert got.json()["field"] == "authorization" and why in got.json()["detail"]


def test_the_right_key_is_answered_and_healthz_stays_open(keyed, hall, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    auth = {"Authorization": f"Bearer {KEY}"}
    got = httpx.post(f"{keyed.url}/v1/hallucination", json=hall_json(hall), headers=auth, timeout=60)
    assert got.status_code == 200, got.text
    assert compared, "the key must be compared with hmac.compare_digest (constant time)"
    lower = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    stats = httpx.get(f"{keyed.url}/v1/stats", headers=lower).json()
    assert stats["ok"] >= 1 and stats["unauthorized"] >= 1
    assert httpx.get(f"{keyed.url}/v1/model", headers=auth).json()["api_key"] is True
    assert httpx.get(f"{keyed.url}/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example:80", "", "attacker.test:8000"]
)
def test_a_host_not_allowed_is_refused_but_healthz_answers(plain, hall, host):
    headers = {"Host": host}
    for method, path, kw in [("POST", "/v1/hallucination", {"json": hall_json(hall)}), ("GET", "/v1/model", {})]:
        got = httpx.request(method, f"{plain.url}{path}", headers=headers, timeout=60, **kw)
        assert got.status_code == 400, got.text
        assert got.json()["field"] == "host" and "allowed-host" in got.json()["detail"]
    assert httpx.get(f"{plain.url}/healthz", headers=headers).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
def test_the_loopback_names_are_allowed_by_default(plain, host):
    got = httpx.get(f"{plain.url}/v1/model", headers={"Host": f"{host}:{plain.port}"})
    assert got.status_code == 200, got.text


def test_an_allow_list_and_any_host(detector):
    with ServerThread(create_app(detector, allowed_hosts=("judge.example.com", "*.internal.example"))) as s:

        def status(host):
            return httpx.get(f"{s.url}/v1/model", headers={"Host": host}).status_code

        assert status("judge.example.com") == 200 and status("a.internal.example:8000") == 200
        assert status("127.0.0.1") == 400 and status("internal.example") == 400 and status("example.com") == 400
        assert httpx.get(f"{s.url}/v1/stats", headers={"Host": "x"}).status_code == 400
        assert httpx.get(f"{s.url}/v1/stats", headers={"Host": "judge.example.com"}).json()["wrong_host"] == 4
    with ServerThread(create_app(detector, allowed_hosts=("*",))) as s:
        assert httpx.get(f"{s.url}/v1/model", headers={"Host": "anything.example"}).status_code == 200


def test_cors_is_off_by_default(plain):
    origin = {"Origin": "https://app.example"}
    got = httpx.get(f"{plain.url}/v1/model", headers=origin)
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
    preflight = httpx.options(
        f"{plain.url}/v1/hallucination", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_for_the_origins_given_with_the_key_still_required(detector, hall):
    app = create_app(detector, api_key=KEY, cors_origins=("https://app.example",))
    with ServerThread(app) as s:
        preflight = httpx.options(
            f"{s.url}/v1/hallucination",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        other = httpx.options(
            f"{s.url}/v1/hallucination",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        unauth = httpx.post(
            f"{s.url}/v1/hallucination", json=hall_json(hall), headers={"Origin": "https://app.example"}, timeout=60
        )
        assert unauth.status_code == 401  # CORS lets the page read the answer; it does not let it in
        assert unauth.headers["access-control-allow-origin"] == "https://app.example"
        ok = httpx.post(
            f"{s.url}/v1/hallucination",
            json=hall_json(hall),
            timeout=60,
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"},
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"


def test_the_docs_are_off_unless_asked(plain, detector):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{plain.url}{path}").status_code == 404, path
    with ServerThread(create_app(detector, docs=True)) as s:
        assert httpx.get(f"{s.url}/docs").status_code == 200
        assert "/v1/hallucination" in httpx.get(f"{s.url}/openapi.json").json()["paths"]


def test_a_key_that_cannot_travel_in_a_header_is_refused(detector):
    for bad in ("", "has space", "tab\tkey", "kéy"):
        with pytest.raises(ValueError, match="printable ASCII"):
            create_app(detector, api_key=bad)


@pytest.mark.parametrize(
    "host, key, warned",
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.168.1.20", None, True),
        ("judge.example.com", None, True),
        ("0.0.0.0", KEY, False),
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("127.0.0.2", None, False),
    ],
)
def test_run_warns_when_serving_beyond_loopback_without_a_key(model_dir, monkeypatch, caplog, host, key, warned):
    served = []
    monkeypatch.setattr(app_module.uvicorn.Server, "run", lambda self, *a, **kw: served.append(self.config))
    with caplog.at_level(logging.INFO, logger="hkd4vlm.serve"):
        app_module.run(model_dir, host=host, port=8123, shifts=2, api_key=key)
    warnings = [r.getMessage() for r in caplog.records if r.name == "hkd4vlm.serve" and r.levelno == logging.WARNING]
    assert bool(warnings) is warned, warnings
    if warned:
        assert "HKD4VLM_API_KEY" in warnings[0] and "--api-key" in warnings[0]
    assert any(":8123" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert served and served[0].host == host


def test_run_logs_through_logging_so_it_can_be_silenced(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(app_module.uvicorn.Server, "run", lambda self, *a, **kw: None)
    logger = logging.getLogger("hkd4vlm.serve")
    monkeypatch.setattr(logger, "disabled", True)
    app_module.run(model_dir, host="0.0.0.0", shifts=2)
    out = capsys.readouterr()
    assert "serving" not in out.out + out.err and "without an API key" not in out.out + out.err


def test_run_answers_to_its_own_address_by_default(model_dir, monkeypatch):
    made = []
    monkeypatch.setattr(app_module.uvicorn.Server, "run", lambda self, *a, **kw: None)
    monkeypatch.setattr(app_module, "create_app", lambda detector, config: made.append(config.hosts) or "app")
    for host, want in [
        ("127.0.0.1", ("127.0.0.1", "localhost", "::1")),
        ("0.0.0.0", ("*",)),
        ("10.0.0.7", ("127.0.0.1", "localhost", "::1", "10.0.0.7")),
        # other loopback addresses are the server's own address too
        ("127.0.0.2", ("127.0.0.1", "localhost", "::1", "127.0.0.2")),
        ("[::ffff:127.0.0.1]", ("127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1")),
        ("LOCALHOST", ("127.0.0.1", "localhost", "::1")),
    ]:
        app_module.run(model_dir, host=host, shifts=2)
        assert made[-1] == want
    app_module.run(model_dir, host="0.0.0.0", shifts=2, allowed_hosts=("judge.example.com",))
    assert made[-1] == ("judge.example.com",)


def test_cli_serve_takes_the_key_from_the_environment_and_the_access_options(model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module, "run", lambda model_dir, config, **kw: calls.append(config))
    args = [
        "serve",
        "--model",
        str(model_dir),
        "--allowed-host",
        "judge.example.com",
        "--allowed-host",
        "*.corp",
        "--cors-origin",
        "https://app.example",
        "--docs",
    ]
    result = CliRunner().invoke(main, args, env={"HKD4VLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    config = calls[-1]
    assert config.api_key == KEY and config.allowed_hosts == ("judge.example.com", "*.corp")
    assert config.cors_origins == ("https://app.example",) and config.docs is True
    result = CliRunner().invoke(
        main, ["serve", "--model", str(model_dir), "--api-key", "other-key"], env={"HKD4VLM_API_KEY": KEY}
    )
    assert result.exit_code == 0 and calls[-1].api_key == "other-key"  # the option wins over the environment
    assert calls[-1].allowed_hosts == () and calls[-1].docs is False
    assert calls[-1].hosts == ("127.0.0.1", "localhost", "::1")
    result = CliRunner().invoke(main, ["serve", "--model", str(model_dir)], env={"HKD4VLM_API_KEY": "a b"})
    assert result.exit_code == 2 and "printable ASCII" in result.output
