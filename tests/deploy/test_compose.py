"""docker-compose.yml, proven without a Docker engine.

1. The file validates against the current compose specification (check-jsonschema's bundled schema) and
   through Debian's docker-compose 1.29 ``config`` (which also checks ``depends_on`` targets); negative controls
   show each check rejects a broken copy.
2. It is consistent with the project: the taskstream services build this repository's Dockerfile with real
   extras, are configured only through ``TASKSTREAM_*`` variables that taskstream reads, run real ``taskstream``
   verbs with options the CLI accepts and targets that import, wait for healthy brokers, and probe the health
   port they configure; other images are pinned.
3. (test_compose_native.py) every taskstream service command runs natively against local servers.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from taskstream.cli import _register_extensions, cli, load_object
from taskstream.deploy.spec import KNOWN_ENV_VARS

from .conftest import ROOT, require_tool, venv_tool

COMPOSE = ROOT / "docker-compose.yml"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def taskstream_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run this repository's image."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


# -- 1. the compose specification --------------------------------------------------------------------


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose")
    return subprocess.run(
        [tool, "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parent,
    )


def write_variant(tmp_path: Path, change: Any) -> Path:
    data = load_compose()
    change(data)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "Dockerfile").write_text((ROOT / "Dockerfile").read_text())  # build context for `config`
    return path


def test_compose_spec_schema() -> None:
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_schema_rejects_a_broken_file(tmp_path: Path) -> None:
    path = write_variant(tmp_path, lambda d: d["services"]["rabbitmq"].update(helthcheck={"test": ["NONE"]}))
    result = check_jsonschema(path)
    assert result.returncode != 0
    assert "helthcheck" in result.stdout + result.stderr


def test_docker_compose_config() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_rejects_a_missing_dependency(tmp_path: Path) -> None:
    def break_it(data: dict[str, Any]) -> None:
        name = next(iter(taskstream_services(data)))
        data["services"][name]["depends_on"] = {"rabbit": {"condition": "service_healthy"}}

    result = compose_config(write_variant(tmp_path, break_it))
    assert result.returncode != 0
    assert "rabbit" in result.stdout + result.stderr


# -- 2. consistency with the project -----------------------------------------------------------------


def test_images_are_pinned_and_ours_is_built_here() -> None:
    import tomllib

    compose = load_compose()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    ours = taskstream_services(compose)
    assert ours, "no taskstream service"
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if name in ours:
            assert svc["build"]["context"] == "."
            assert (ROOT / svc["build"].get("dockerfile", "Dockerfile")).is_file()
            assert set(svc["build"]["args"]["EXTRAS"].split(",")) <= extras
            assert image.startswith("taskstream:")
        else:
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: pin the image tag, got {image!r}"
            assert "healthcheck" in svc, f"{name}: a server needs a health check for depends_on"


def test_configuration_is_only_known_taskstream_variables() -> None:
    for name, svc in taskstream_services(load_compose()).items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        for var in env:
            assert var.startswith("TASKSTREAM_"), f"{name}: {var} is not a TASKSTREAM_* variable"
            assert var in KNOWN_ENV_VARS, f"{name}: taskstream reads no {var}"
        assert "env_file" not in svc, f"{name}: configuration only through TASKSTREAM_* variables"


def test_broker_urls_point_at_healthy_services() -> None:
    compose = load_compose()
    for name, svc in taskstream_services(compose).items():
        url = urlsplit(svc["environment"]["TASKSTREAM_BROKER_URL"])
        host = url.hostname or ""
        assert host in compose["services"], f"{name}: broker host {host!r} is not a compose service"
        published = {str(p).split(":")[-1] for p in compose["services"][host].get("ports", [])}
        assert str(url.port) in published, f"{name}: {host} does not listen on {url.port}"
        assert svc["depends_on"][host]["condition"] == "service_healthy", name
        for dependency, condition in svc["depends_on"].items():
            assert dependency in compose["services"], f"{name}: depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][dependency], f"{name}: {dependency} has no health check"


def resolve(argv: list[str]) -> Any:
    """Parse ``taskstream ARGV`` with the real CLI (all verbs registered); raises on unknown verbs or options."""
    _register_extensions()
    group = typer.main.get_command(cli)
    ctx = group.make_context("taskstream", list(argv), resilient_parsing=False)
    while hasattr(ctx.command, "resolve_command"):  # a group: descend into the verb
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        name, command, rest = ctx.command.resolve_command(ctx, [*protected, *ctx.args])
        assert command is not None, f"no verb {name!r}"
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_resolve_parses_like_the_cli() -> None:
    ctx = resolve(["run", "examples.two_stage:app", "--health-port", "8080"])
    assert ctx.command_path == "taskstream run"
    assert ctx.params["target"] == "examples.two_stage:app" and ctx.params["health_port"] == 8080
    for bad in (["nope"], ["run", "examples.two_stage:app", "--bogus"], ["run"]):
        with pytest.raises(Exception, match=r"(?i)no such|usage|missing"):
            resolve(bad)


def test_commands_are_real_taskstream_verbs() -> None:
    from taskstream.app import App

    for name, svc in taskstream_services(load_compose()).items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: write the command as a list"
        try:
            ctx = resolve(command)
        except Exception as exc:  # the CLI's own usage errors (typer bundles its own click)
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            pytest.fail(f"{name}: `taskstream {' '.join(command)}` does not parse: {message}")
        path = ctx.command_path.split()[1:]
        assert path in (["worker"], ["run"], ["pipeline", "run"]), f"{name}: unexpected verb {path}"
        target = ctx.params["target"]
        obj = load_object(target)
        if path != ["pipeline", "run"]:
            assert isinstance(obj, App), f"{name}: {target} is not an App"


def test_health_checks_probe_the_configured_port() -> None:
    for name, svc in taskstream_services(load_compose()).items():
        port = svc["environment"].get("TASKSTREAM_HEALTH_PORT")
        check = " ".join(svc.get("healthcheck", {}).get("test", []))
        if port is None:
            assert "healthcheck" not in svc or svc["healthcheck"].get("disable"), name
            continue
        assert f"127.0.0.1:{port}/readyz" in check, f"{name}: health check does not probe {port}"


def test_window_stage_runs_on_several_replicas_and_the_source_starts_last() -> None:
    replicas: dict[str, list[int]] = {}
    services: dict[str, list[str]] = {}
    compose = load_compose()
    for name, svc in taskstream_services(compose).items():
        command = svc["command"]
        if command[:2] == ["pipeline", "run"]:
            stage = command[command.index("--stage") + 1]
            replicas.setdefault(stage, []).append(int(command[command.index("--replica") + 1]))
            services.setdefault(stage, []).append(name)
    (source,) = services["sensor"]
    consumers = {name for stage, names in services.items() if stage != "sensor" for name in names}
    assert consumers <= set(compose["services"][source]["depends_on"])
    assert "windows" in replicas, replicas
    assert len(replicas["windows"]) >= 2
    for stage, indices in replicas.items():
        assert sorted(indices) == list(range(len(indices))), f"stage {stage}: replicas {indices}"


def test_the_variant_helper_really_changes_the_file(tmp_path: Path) -> None:
    original = load_compose()
    path = write_variant(tmp_path, lambda d: d["services"].pop("azurite"))
    changed = yaml.safe_load(path.read_text())
    assert set(original["services"]) - set(changed["services"]) == {"azurite"}
    assert copy.deepcopy(original) == load_compose()
