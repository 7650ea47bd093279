"""`taskstream deploy`: every URL setting is a secret, so a key in any of them stays out of units and manifests.

Store URLs carry keys as often as broker URLs do (``azureblob://c?connection_string=...AccountKey=...``,
``s3://bucket?aws_secret_access_key=...``, ``redis://:password@...``): like the broker URL, they belong in the
environment file (systemd, cloud-init) or the Kubernetes Secret, and the rendered files never hold them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from taskstream.deploy import build_spec, render_cloud_init, render_k8s, render_systemd
from taskstream.deploy.spec import SECRET_ENV_VARS, is_secret_env
from taskstream.errors import ConfigurationError
from taskstream.settings import URL_SETTINGS, env_name

from .conftest import ROOT, VENV_BIN

SECRET = "Zm9vYmFyS2V5MTIzNDU2Nzg5MA"

SECRET_PAIRS = [
    f"TASKSTREAM_PAYLOAD_STORE_URL=azureblob://blobs?connection_string=AccountName%3Da%3BAccountKey%3D{SECRET}",
    f"TASKSTREAM_PAYLOAD_STORE_URL=s3://bucket/big?region=eu-west-1&aws_secret_access_key={SECRET}",
    f"TASKSTREAM_STATE_URL=redis://:{SECRET}@redis:6379/0",
    f"TASKSTREAM_RESULT_STORE_URL=redis://redis:6379/0?password={SECRET}",
    f"TASKSTREAM_BROKER_URL=azurequeue://acct.queue.core.windows.net?credential={SECRET}",
    f"BLOBS=azureblob://blobs?credential={SECRET}",
    f"ENDPOINT=https://acct.queue.core.windows.net/?sv=2023-11-03&se=2030-01-01&sig={SECRET}",
    f"AWS_SESSION_TOKEN={SECRET}",
]


def test_every_url_setting_is_a_secret_variable() -> None:
    for field in URL_SETTINGS:
        assert env_name(field) in SECRET_ENV_VARS
        assert is_secret_env(env_name(field))
    assert not is_secret_env("TASKSTREAM_PREFETCH")


@pytest.mark.parametrize("pair", SECRET_PAIRS, ids=lambda p: p.split("=", 1)[0])
def test_a_secret_in_env_is_refused_and_never_echoed(pair: str) -> None:
    with pytest.raises(ConfigurationError, match="environment file") as info:
        build_spec("worker", "examples.two_stage:app", env=[pair])
    assert SECRET not in str(info.value)


def test_the_secrets_file_template_names_every_url_setting() -> None:
    spec = build_spec("worker", "examples.two_stage:app", venv=str(VENV_BIN.parent))
    template = render_systemd(spec)[f"{spec.name}.env.example"]
    for field in URL_SETTINGS:
        assert env_name(field) in template
    unit = render_systemd(spec)[spec.unit_name()]
    assert f"EnvironmentFile=-{spec.env_file}" in unit or f"EnvironmentFile={spec.env_file}" in unit
    assert "_URL" not in "".join(line for line in unit.splitlines() if line.startswith("Environment="))
    text = render_k8s(spec, image="taskstream:test")
    assert f"--from-env-file={spec.name}.env" in text
    (deployment,) = yaml.safe_load_all(text)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": spec.secret_name}}]
    assert not [e for e in container["env"] if e["name"].endswith("_URL")]


def test_store_urls_from_a_secrets_file_go_only_into_the_root_only_file() -> None:
    spec = build_spec("worker", "examples.two_stage:app", venv=str(VENV_BIN.parent))
    secrets = "\n".join(
        [
            "TASKSTREAM_BROKER_URL=amqp://app:pw@broker:5672/",
            f"TASKSTREAM_PAYLOAD_STORE_URL=azureblob://blobs?connection_string=AccountKey%3D{SECRET}",
            f"TASKSTREAM_STATE_URL=redis://:{SECRET}@redis:6379/0",
        ]
    )
    doc = yaml.safe_load(render_cloud_init(spec, requirements=["taskstream"], secrets=secrets))
    holding = [f for f in doc["write_files"] if SECRET in f.get("content", "")]
    assert [(f["path"], f["permissions"], f["owner"]) for f in holding] == [(spec.env_file, "0600", "root:root")]


@pytest.mark.parametrize("renderer", ["systemd", "cloud-init", "k8s"])
def test_the_cli_renders_nothing_holding_a_store_key(renderer: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            str(VENV_BIN / "taskstream"), "deploy", renderer, "worker", "examples.two_stage:app",
            "--env", "TASKSTREAM_PREFETCH=10", "--env", SECRET_PAIRS[0], "-o", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "TASKSTREAM_PAYLOAD_STORE_URL carries a credential" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert not any(SECRET in p.read_text() for p in out.rglob("*") if p.is_file())
