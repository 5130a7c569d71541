"""ServeConfig owns every setting of the service: the command line is made from it, create_app and run read it,
GET /v1/model reports it, the typed request and response models show in /openapi.json, and nothing else keeps
a default of its own."""

import inspect

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pydantic import ValidationError  # noqa: E402

from hkd4vlm.cli import main  # noqa: E402
from hkd4vlm.infer.shifts import parse_shifts  # noqa: E402
from hkd4vlm.serve import MicroBatcher, ServeConfig, ServerThread, create_app  # noqa: E402
from hkd4vlm.serve import app as app_module  # noqa: E402


def test_every_setting_is_a_serve_option_with_the_configs_default():
    params = {p.name: p for p in main.commands["serve"].params}
    for name, field in ServeConfig.model_fields.items():
        assert name in params, f"ServeConfig.{name} has no serve option"
        default = params[name].default
        if name == "shifts":
            default = parse_shifts(default)
        elif params[name].multiple:
            default = tuple(default or ())
        assert default == field.default, name
        assert params[name].help == field.description, name
    assert set(params) - set(ServeConfig.model_fields) == {"model_dir", "device", "dtype"}


def test_the_batcher_create_app_and_run_keep_no_defaults_of_their_own():
    batcher = inspect.signature(MicroBatcher.__init__).parameters
    assert all(batcher[n].default is inspect.Parameter.empty for n in ("max_batch_size", "max_wait_ms", "max_queue"))
    for fn in (create_app, app_module.run):
        settings = [p for p in inspect.signature(fn).parameters if p in ServeConfig.model_fields]
        assert settings == [], f"{fn.__name__} spells out {settings}: they belong to ServeConfig"


@pytest.mark.parametrize(
    "settings, why",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"shifts": 0}, "shifts must be at least 1"),
        ({"max_body_mb": 0}, "max_body_mb"),
        ({"max_inflight_mb": 1}, "must hold at least one request"),
        ({"api_key": "has space"}, "printable ASCII"),
        ({"max_batch": 3}, "max_batch"),  # a misspelt setting is an error, not ignored
    ],
)
def test_bad_settings_are_refused_naming_them(settings, why):
    with pytest.raises(ValidationError, match=why):
        ServeConfig(**settings)


def test_the_cli_refuses_a_bad_setting_naming_its_option(model_dir):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["serve", "--model", str(model_dir), "--max-inflight-mb", "1"])
    assert result.exit_code == 2 and "--max-inflight-mb" in result.output and "at least one request" in result.output


def test_create_app_reads_the_config_and_reports_it(detector):
    config = ServeConfig(max_batch_size=3, max_body_mb=2.5, max_text_chars=100, allowed_hosts=("judge.example",))
    with ServerThread(create_app(detector, config, max_queue=7)) as s:  # settings by name go over the config
        info = httpx.get(f"{s.url}/v1/model", headers={"Host": "judge.example"}).json()
    assert (info["max_batch_size"], info["max_queue"], info["max_text_chars"]) == (3, 7, 100)
    assert info["max_body_mb"] == 2.5 and info["max_body_bytes"] == int(2.5 * 2**20)
    assert info["allowed_hosts"] == ["judge.example"] and info["api_key"] is False
    assert info["shifts"] == detector.shifts and info["name"] == detector.name


def test_create_app_refuses_a_config_whose_shifts_the_detector_does_not_score(detector):
    with pytest.raises(ValueError, match="shifts"):
        create_app(detector, shifts=detector.shifts + 1)
    create_app(detector, shifts=detector.shifts)  # the same is fine


def test_the_api_key_never_shows(detector):
    config = ServeConfig(api_key="s3cret-Key")
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.public())


def test_openapi_shows_the_typed_requests_and_answers(detector):
    with ServerThread(create_app(detector, docs=True)) as s:
        spec = httpx.get(f"{s.url}/openapi.json").json()
    for path, fields in [("/v1/hallucination", {"caption", "options"}), ("/v1/factuality", {"claim", "context"})]:
        op = spec["paths"][path]["post"]
        content = op["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        assert fields | {"image"} <= set(content["multipart/form-data"]["schema"]["properties"])
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Answer")
        assert {"413", "422", "503"} <= set(op["responses"])
    answer = spec["components"]["schemas"]["Answer"]["properties"]
    assert {"prediction", "options", "probabilities", "agreement", "votes", "shifts"} <= set(answer)
