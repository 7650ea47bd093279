"""`taskstream deploy`: rendered files are valid for their own tools, and secrets stay out of them.

* systemd units pass `systemd-analyze verify` with no warning at all (it exits 0 on unknown keys, so the test
  also demands silent output, and a negative control proves a typo is caught);
* the cloud-config passes `cloud-init schema` and uses only keys its schema knows;
* the Kubernetes manifests pass kubernetes-validate's strict schema check offline.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskstream.deploy import build_spec, render_cloud_init, render_k8s, render_systemd, render_unit
from taskstream.deploy.k8s import manifests
from taskstream.deploy.spec import KNOWN_ENV_VARS, parse_stage
from taskstream.deploy.systemd import quote_exec_arg
from taskstream.deploy.yamlout import dump, dump_all
from taskstream.errors import ConfigurationError
from taskstream.settings import Settings

from .conftest import ROOT, VENV_BIN, require_tool

SECRET = "s3cr3t-Passw0rd"
PLANT = "plant.sensor_windows:pipeline"  # not importable here: stage names are taken as given


def stage_spec(**overrides: Any) -> Any:
    options: dict[str, Any] = {
        "stages": ["calibrate", "window=3", "sink"],
        "env": ["TASKSTREAM_PREFETCH=200", "TASKSTREAM_CONCURRENCY=4"],
        "venv": str(VENV_BIN.parent),
    }
    options.update(overrides)
    return build_spec("stage", PLANT, **options)


def worker_spec(**overrides: Any) -> Any:
    options: dict[str, Any] = {"health_port": 8080, "venv": str(VENV_BIN.parent), "args": ["--concurrency", "8"]}
    options.update(overrides)
    return build_spec("worker", "examples.endpoint:app", **options)


# -- YAML writer ---------------------------------------------------------------------------------------


def test_yaml_writer_round_trips_awkward_values() -> None:
    data = {
        "plain": "taskstream-x@0.service",
        "looks_boolean": ["yes", "No", "on", "OFF", "y", "true", "null", "~"],
        "looks_numeric": ["0600", "1e3", "0x10", "8080", "1_000", ".5"],
        "punctuation": ["--stage", "a: b", "# not a comment", "[x]", "{y}", "*ref", "&anchor", "!tag", "'q'", '"d"'],
        "text": "first\n  indented\n\nlast\n",
        "no_final_newline": "a\nb",
        "trailing_blank_lines": "a\n\n\n",
        "leading_space_text": "  x\ny",
        "trailing_space_line": "x  \ny",
        "unicode": "température °C",
        "empty": ["", [], {}],
        "nested": [{"a": [{"b": None}, [1, [2.5, False]]]}],
    }
    assert yaml.safe_load(dump(data)) == data
    assert list(yaml.safe_load_all(dump_all([data, {"k": 1}]))) == [data, {"k": 1}]


# -- the spec ------------------------------------------------------------------------------------------


def test_stage_syntax() -> None:
    assert parse_stage("window=3").replicas == (0, 1, 2)
    assert parse_stage("window@2,0").replicas == (0, 2)
    assert parse_stage("sink").replicas == (0,)
    for bad in ("window=0", "window=x", "win dow", "w@"):
        with pytest.raises(ConfigurationError):
            parse_stage(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"env": [f"TASKSTREAM_BROKER_URL=amqp://u:{SECRET}@h/"]}, "carries a credential"),
        ({"env": [f"AWS_SECRET_ACCESS_KEY={SECRET}"]}, "carries a credential"),
        ({"env": [f"TASKSTREAM_STATE_URL=redis://:{SECRET}@redis:6379/0"]}, "carries a credential"),
        ({"env": [f"STATE=redis://:{SECRET}@redis:6379/0"]}, "holds a credential"),
        ({"env": ["TASKSTREAM_PREFETC=10"]}, "did you mean TASKSTREAM_PREFETCH"),
        ({"env": ["TASKSTREAM_PREFETCH"]}, "KEY=VALUE"),
        ({"env": ["TASKSTREAM_PREFETCH=1\nExecStart=/bin/evil"]}, "one line"),
        ({"stages": []}, "--stage NAME"),
        ({"stages": ["sink", "sink"]}, "named once"),
        ({"health_port": 8080}, "serves no health endpoint"),
        ({"name": "Bad_Name"}, "lowercase"),
        ({"workdir": "relative/dir"}, "absolute"),
        ({"restart": "sometimes"}, "on-failure or always"),
    ],
)
def test_bad_specs_say_what_is_wrong(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        stage_spec(**kwargs)
    assert SECRET not in str(info.value)


def test_known_env_vars_are_settings_fields_or_read_in_the_source() -> None:
    fields = {f"TASKSTREAM_{f.upper()}" for f in Settings.model_fields}
    assert fields <= KNOWN_ENV_VARS
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "taskstream").rglob("*.py") if "deploy" not in p.parts)
    for var in KNOWN_ENV_VARS - fields:
        assert f'"{var}"' in source, f"{var} is documented but nothing outside deploy/ reads it"
    assert build_spec("worker", "m:app", env=["TASKSTREAM_HEALTH_HOST=127.0.0.1"]).env


# -- systemd -------------------------------------------------------------------------------------------


def verify_units(directory: Path, names: list[str]) -> str:
    """Run systemd-analyze verify; return everything it printed (empty means clean)."""
    tool = require_tool("systemd-analyze")
    result = subprocess.run(
        [tool, "verify", *(str(directory / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    output = (result.stdout + result.stderr).strip()
    return output if output or result.returncode == 0 else f"exit {result.returncode}"


def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    files = {**render_systemd(stage_spec()), **render_systemd(worker_spec(user="taskstream"))}
    files.update(render_systemd(build_spec("run", "examples.two_stage:app", replicas=2, venv=str(VENV_BIN.parent))))
    names = [n for n in files if n.endswith(".service")]
    assert sorted(names) == [
        "taskstream-endpoint.service",
        "taskstream-sensor-windows-calibrate@.service",
        "taskstream-sensor-windows-sink@.service",
        "taskstream-sensor-windows-window@.service",
        "taskstream-two-stage@.service",
    ]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # Templates verify as themselves and as instances (the instance name is what `systemctl enable` uses).
    instances = []
    for name in names:
        if "@." in name:
            instance = name.replace("@.", "@2.")
            (tmp_path / instance).write_text(files[name])
            instances.append(instance)
    assert verify_units(tmp_path, names + instances) == ""

    # Negative control: the same check reports a misspelt key (systemd-analyze itself still exits 0).
    broken = files["taskstream-endpoint.service"].replace("Restart=on-failure", "Restrat=on-failure")
    (tmp_path / "broken.service").write_text(broken)
    assert "Unknown key" in verify_units(tmp_path, ["broken.service"])


def test_systemd_unit_contents() -> None:
    spec = stage_spec()
    window = next(s for s in spec.stages if s.name == "window")
    unit = render_unit(spec, window)
    lines = unit.splitlines()
    command = f"pipeline run {PLANT} --stage window --replica %i"
    assert f"ExecStart={VENV_BIN}/taskstream {command}" in lines
    assert "Restart=on-failure" in lines
    assert "EnvironmentFile=/etc/taskstream/sensor-windows.env" in lines
    assert "ConditionPathExists=/etc/taskstream/sensor-windows.env" in lines
    assert 'Environment="TASKSTREAM_PREFETCH=200"' in lines
    assert "DynamicUser=yes" in lines
    assert not any(line.startswith("Environment=") and "BROKER_URL" in line for line in lines)
    assert spec.unit_instances(window) == [f"taskstream-sensor-windows-window@{i}.service" for i in range(3)]

    worker = render_unit(worker_spec(user="taskstream"))
    assert f"ExecStart={VENV_BIN}/taskstream worker examples.endpoint:app --concurrency 8" in worker.splitlines()
    assert 'Environment="TASKSTREAM_HEALTH_PORT=8080"' in worker.splitlines()
    assert "User=taskstream" in worker.splitlines()

    env_template = render_systemd(spec)["sensor-windows.env.example"]
    assert "TASKSTREAM_BROKER_URL=amqp://USER:PASSWORD@BROKER-HOST:5672/" in env_template


def test_exec_start_quoting(tmp_path: Path) -> None:
    assert quote_exec_arg("--rate=50%") == "--rate=50%%"
    assert quote_exec_arg("$HOME") == "$$HOME"
    assert quote_exec_arg('say "hi"') == '"say \\"hi\\""'
    spec = worker_spec(args=["--label", "two words", "--pct", "50%", "--x", "$HOME"])
    unit = render_unit(spec)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    # systemd's ExecStart splitting, undone: shell-like words, then %% -> % and $$ -> $.
    words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start.removeprefix("ExecStart="))]
    assert words[-6:] == ["--label", "two words", "--pct", "50%", "--x", "$HOME"]
    (tmp_path / "q.service").write_text(unit)
    assert verify_units(tmp_path, ["q.service"]) == ""


# -- cloud-init ----------------------------------------------------------------------------------------


def cloud_init_schema_keys() -> set[str]:
    import glob

    paths = glob.glob("/usr/lib/python3/dist-packages/cloudinit/config/schemas/schema-cloud-config-v1.json")
    if not paths:
        require_tool("cloud-init-schema-file-missing")
    schema = json.loads(Path(paths[0]).read_text())
    keys: set[str] = set()
    for ref in schema["allOf"]:
        keys |= set(schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]].get("properties", {}))
    return keys


def cloud_init_check(path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("cloud-init")
    return subprocess.run([tool, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("with_secrets", [True, False])
def test_cloud_init_passes_its_schema(tmp_path: Path, with_secrets: bool) -> None:
    spec = stage_spec(stages=["window@1,2", "sink"], user="taskstream" if with_secrets else None)
    secrets = f"# broker\nTASKSTREAM_BROKER_URL=amqp://app:{SECRET}@10.0.0.5:5672/\n" if with_secrets else None
    files = {"examples/__init__.py": "", "examples/sensor_windows.py": "PIPELINE = 1\n"}
    text = render_cloud_init(spec, requirements=["taskstream[rabbitmq]==0.1.0"], files=files, secrets=secrets)
    assert text.startswith("#cloud-config\n")
    path = tmp_path / "user-data.yaml"
    path.write_text(text)
    result = cloud_init_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout + result.stderr

    doc = yaml.safe_load(text)
    assert set(doc) <= cloud_init_schema_keys(), set(doc) - cloud_init_schema_keys()
    written = {f["path"]: f for f in doc["write_files"]}
    window = next(s for s in spec.stages if s.name == "window")
    assert written["/etc/systemd/system/taskstream-sensor-windows-window@.service"]["content"] == render_unit(
        spec, window
    )
    app_file = written["/opt/taskstream/app/examples/sensor_windows.py"]
    assert app_file["encoding"] == "gz+b64"
    assert gzip.decompress(base64.b64decode(app_file["content"])) == b"PIPELINE = 1\n"
    assert doc["runcmd"][-1] == [
        "systemctl",
        "enable",
        "--now",
        "taskstream-sensor-windows-window@1.service",
        "taskstream-sensor-windows-window@2.service",
        "taskstream-sensor-windows-sink@0.service",
    ]
    install = doc["runcmd"][0]
    assert install[:2] == ["sh", "-c"]
    assert subprocess.run(["sh", "-n", "-c", install[2]], timeout=30).returncode == 0
    assert "'taskstream[rabbitmq]==0.1.0'" in install[2]
    if with_secrets:
        env_file = written["/etc/taskstream/sensor-windows.env"]
        assert (env_file["permissions"], env_file["owner"]) == ("0600", "root:root")
        assert [u["name"] for u in doc["users"] if isinstance(u, dict)] == ["taskstream"]
        # The secret is in the root-only file and nowhere else.
        assert sum(SECRET in f["content"] for f in doc["write_files"]) == 1
    else:
        assert SECRET not in text
        assert "/etc/taskstream/sensor-windows.env" not in written
        assert "then systemctl start them" in doc["final_message"]


def test_cloud_init_check_catches_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("#cloud-config\nruncmd: 5\nwrite_files:\n  - path: /x\n    permissions: 0600\n")
    result = cloud_init_check(path)
    assert result.returncode != 0
    assert "runcmd" in result.stdout + result.stderr


def test_cloud_init_refuses_bad_inputs() -> None:
    with pytest.raises(ConfigurationError, match="line 2 is not KEY=VALUE"):
        render_cloud_init(stage_spec(), secrets=f"A=1\nexport {SECRET}\n")
    with pytest.raises(ConfigurationError, match="relative"):
        render_cloud_init(stage_spec(), files={"../etc/passwd": "x"})


# -- Kubernetes ----------------------------------------------------------------------------------------


def test_k8s_manifests_validate_offline(tmp_path: Path) -> None:
    import kubernetes_validate

    stage = stage_spec()
    docs = manifests(stage, image="registry.example/taskstream:0.1.0", namespace="sensors")
    worker_docs = manifests(worker_spec(replicas=3), image="taskstream:0.1.0")
    names = [d["metadata"]["name"] for d in docs]
    assert names == [
        "sensor-windows-calibrate-0",
        "sensor-windows-window-0",
        "sensor-windows-window-1",
        "sensor-windows-window-2",
        "sensor-windows-sink-0",
    ]
    version = kubernetes_validate.latest_version()
    for doc in [*docs, *worker_docs]:
        assert doc["kind"] == "Deployment"
        kubernetes_validate.validate(doc, version, strict=True)

    window2 = docs[3]["spec"]["template"]["spec"]["containers"][0]
    assert window2["args"] == [
        "pipeline",
        "run",
        PLANT,
        "--stage",
        "window",
        "--replica",
        "2",
    ]
    assert docs[3]["spec"]["replicas"] == 1 and docs[3]["spec"]["strategy"] == {"type": "Recreate"}
    worker = worker_docs[0]
    assert worker["spec"]["replicas"] == 3
    probe = worker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": "health"}

    # The rendered text parses back to the same objects, and the CLI validator accepts the file.
    text = render_k8s(stage, image="registry.example/taskstream:0.1.0", namespace="sensors")
    assert list(yaml.safe_load_all(text)) == docs
    path = tmp_path / "sensors.yaml"
    path.write_text(text)
    cli = VENV_BIN / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 5


def test_k8s_validation_catches_errors() -> None:
    import kubernetes_validate

    doc = manifests(worker_spec(), image="taskstream:0.1.0")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


# -- the CLI -------------------------------------------------------------------------------------------


def taskstream(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskstream.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_cli_renders_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = taskstream(
        "deploy", "systemd", "stage", "examples.sensor_windows:pipeline", "--stage", "windows=3",
        "--venv", str(VENV_BIN.parent), "-o", str(out), "--", "--verbose",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "sensor-windows.env.example",
        "taskstream-sensor-windows-windows@.service",
    ]
    assert "--replica %i --verbose" in (out / "taskstream-sensor-windows-windows@.service").read_text()

    secrets = tmp_path / "prod.env"
    secrets.write_text(f"TASKSTREAM_BROKER_URL=amqp://app:{SECRET}@broker:5672/\n")
    result = taskstream(
        "deploy", "cloud-init", "worker", "examples.two_stage:app", "--name", "orders",
        "--include", "examples", "--secrets-file", str(secrets), "-r", "taskstream[rabbitmq]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    paths = {f["path"] for f in doc["write_files"]}
    assert {"/opt/taskstream/app/examples/two_stage.py", "/etc/systemd/system/taskstream-orders.service"} <= paths
    assert SECRET not in result.stderr

    result = taskstream("deploy", "k8s", "worker", "examples.two_stage:app", "--replicas", "2", "--health-port", "9000")
    assert result.returncode == 0, result.stderr
    (deployment,) = yaml.safe_load_all(result.stdout)
    assert deployment["spec"]["replicas"] == 2


def test_cli_errors_are_one_clear_line() -> None:
    result = taskstream(
        "deploy", "systemd", "worker", "examples.two_stage:app", "--env", f"TASKSTREAM_SIGNING_KEY={SECRET}"
    )
    assert result.returncode == 2
    assert "taskstream: error: TASKSTREAM_SIGNING_KEY carries a credential" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    result = taskstream("deploy", "k8s", "stage", PLANT)
    assert result.returncode == 2
    assert "--stage NAME" in result.stderr
    result = taskstream("deploy", "k8s", "stage", "examples.stack:pipeline", "--stage", "window=3")
    assert result.returncode == 2
    assert "has no stage 'window'; it has sensor, windows, store" in result.stderr
    result = taskstream("deploy", "k8s", "stage", "examples.stack:pipeline", "--stage", "windows@3")
    assert result.returncode == 2
    assert "no replica 3" in result.stderr


def test_stages_default_to_the_pipelines_own() -> None:
    spec = build_spec("stage", "examples.stack:pipeline")
    assert [(s.name, s.replicas) for s in spec.stages] == [("sensor", (0,)), ("windows", (0, 1, 2)), ("store", (0,))]
    names = [d["metadata"]["name"] for d in manifests(spec, image="taskstream:0.1.0")]
    assert names == ["stack-sensor-0", "stack-windows-0", "stack-windows-1", "stack-windows-2", "stack-store-0"]
