"""Settings: redaction of every secret a URL can carry, and empty variables meaning unset."""

from __future__ import annotations

import pytest

from taskstream.settings import Settings, redact_url

SECRET = "s3cr3t-K3y/with+signs=="

#: Query names that carry credentials in the URLs taskstream and its drivers read.
SECRET_QUERY_NAMES = (
    "aws_secret_access_key",
    "aws_session_token",
    "aws_access_key_id",
    "credential",
    "account_key",
    "AccountKey",
    "connection_string",
    "password",
    "keyfile_password",
    "sig",
    "se",
    "sv",
    "sp",
    "st",
    "spr",
    "srt",
    "ss",
    "skoid",
    "token",
    "anything_new",
)


@pytest.mark.parametrize("name", SECRET_QUERY_NAMES)
def test_redact_url_hides_every_query_value_not_known_to_be_harmless(name: str) -> None:
    for url in (
        f"azurequeue://acct.queue.core.windows.net?{name}={SECRET}",
        f"s3://bucket/prefix?region=eu-west-1&{name}={SECRET}&create=1",
        f"sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324&{name}={SECRET}",
    ):
        redacted = redact_url(url)
        assert SECRET not in redacted, url
        assert f"{name}=***" in redacted
        assert "s3cr3t" not in redacted


def test_redact_url_hides_a_sas_token_given_as_the_whole_query() -> None:
    sas = "sv=2023-11-03&ss=q&srt=sco&sp=rwdlacup&se=2030-01-01T00:00:00Z&st=2024-01-01&spr=https&sig=AbC%2Bd%3D"
    redacted = redact_url(f"azurequeue://acct.queue.core.windows.net/?{sas}")
    assert "AbC" not in redacted
    assert "2030-01-01" not in redacted
    assert "rwdlacup" not in redacted


def test_redact_url_hides_passwords_and_keeps_users() -> None:
    assert redact_url("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"
    assert redact_url(f"redis://:{SECRET}@redis:6379/0") == "redis://:***@redis:6379/0"
    key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq%2FK1SZFPTOtr%2FKBHBeksoGMGw%3D%3D"
    redacted = redact_url(f"azurequeue://devstoreaccount1:{key}@azurite:10001/devstoreaccount1")
    assert key not in redacted
    assert redacted == "azurequeue://devstoreaccount1:***@azurite:10001/devstoreaccount1"


@pytest.mark.parametrize(
    "url",
    [
        "sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324&queue_prefix=dev&wait_time=5&visibility_timeout=30",
        "sqs:///?profile=dev&max_receives=4&max_receive_count=5&max_message_bytes=262144&create_queues=false",
        "sqs://eu-west-1/?max_connections=10&close_grace=3",
        "amqp://guest@host:5672/vh?queue_type=quorum&prefetch=10&publish_timeout=5&heartbeat=30&name=worker",
        "amqp://h/?connect_timeout=3&reconnect_timeout=60&reconnect_interval=1&persistent=0&durable=1",
        "amqps://h/?topic_exchange=t&max_message_bytes=1000&cafile=/etc/ca.pem&no_verify_ssl=0",
        "azurequeue://devstorage?host=azurite&secure=false&visibility_timeout=30&poll_interval=1&message_ttl=-1",
        "azurequeue://devstorage?max_in_flight=8&foreign_encoding=base64&api_version=2021-02-12",
        "zmq://127.0.0.1:5555?heartbeat=1&liveness=5&request_timeout=10&hwm=1000&max_message_bytes=1000",
        "memory://hub?visibility_timeout=2&max_message_bytes=1000",
        "s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1&region_name=us-east-1&create=1",
        "azureblob://container/prefix?create=1",
        "redis://redis:6379/0?socket_timeout=5&db=1&ssl_cert_reqs=none",
        "sqlite:////var/lib/taskstream/results.db",
    ],
)
def test_redact_url_keeps_harmless_options(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_redacts_credentials_inside_an_allowed_url_value() -> None:
    redacted = redact_url(f"sqs://us-east-1/?endpoint_url=http://user:{SECRET}@proxy:9324&wait_time=5")
    assert SECRET not in redacted
    assert "wait_time=5" in redacted


def test_redact_url_never_echoes_an_unparseable_url() -> None:
    assert SECRET not in redact_url(f"amqp://u:{SECRET}@[bad")


URL_SETTINGS = ("broker_url", "result_store_url", "payload_store_url", "state_url")


@pytest.mark.parametrize("field", URL_SETTINGS)
def test_an_empty_url_variable_means_unset(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"TASKSTREAM_{field.upper()}", "")
    settings = Settings()
    default = Settings.model_fields[field].default
    value = getattr(settings, field)
    if default is None:
        assert value is None
    else:
        assert value.get_secret_value() == default.get_secret_value()


@pytest.mark.parametrize("field", ["max_message_bytes", "signing_key", "payload_threshold"])
def test_an_empty_optional_variable_means_unset(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"TASKSTREAM_{field.upper()}", "")
    assert getattr(Settings(), field) is None


def test_the_url_settings_are_secret_and_redacted_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in URL_SETTINGS:
        monkeypatch.setenv(f"TASKSTREAM_{field.upper()}", f"redis://:{SECRET}@h:6379/0")
    settings = Settings()
    assert SECRET not in repr(settings)
    for field in URL_SETTINGS:
        assert getattr(settings, field).get_secret_value().startswith("redis://")
