"""docker-compose.yml, proven without a Docker engine.

1. The file validates against the current compose specification (check-jsonschema's bundled schema) and
   through Debian's docker-compose 1.29 ``config`` (which also checks ``depends_on`` targets); negative controls
   show each check rejects a broken copy.
2. It is consistent with the project: the taskstream services build this repository's Dockerfile with real
   extras, are configured only through ``TASKSTREAM_*`` variables that taskstream reads, run real ``taskstream``
   verbs with options the CLI accepts and targets that import, wait for healthy brokers, and probe the health
   port they configure; other images are pinned.
3. Prometheus and Grafana: the scrape config passes promtool and scrapes every taskstream service on the port
   it serves /metrics on; Grafana's provisioning and dashboard are the mounted files of this repository, every
   panel reads the provisioned datasource, and every query parses as PromQL (promtool) and uses only metric
   names and labels of taskstream's metrics catalogue.
4. (test_compose_native.py) every taskstream service command runs natively against local servers, scraped by
   a native Prometheus with the stack's scrape config, which answers the dashboard's queries.
"""

from __future__ import annotations

import copy
import json
import re
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


# -- 3. Prometheus and Grafana -----------------------------------------------------------------------

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "taskstream.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "taskstream.yml"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
#: what Grafana puts in place of its variables before Prometheus sees a query
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$queue": ".*"}


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def scrape_targets(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(job, host, port) of every static target of a Prometheus config."""
    found = []
    for job in config["scrape_configs"]:
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                host, _, port = target.rpartition(":")
                found.append((job["job_name"], host, port))
    return found


def container_ports(svc: dict[str, Any]) -> set[str]:
    return {str(entry).rpartition(":")[2] for entry in svc.get("ports", [])}


def scrape_problems(compose: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What is wrong between the scrape config and the compose services (empty when they agree)."""
    problems = []
    ours = taskstream_services(compose)
    scraped = set()
    for job, host, port in scrape_targets(config):
        svc = compose["services"].get(host)
        if svc is None:
            problems.append(f"{job}: target {host}:{port} is not a compose service")
        elif host in ours:
            scraped.add(host)
            health = str(svc.get("environment", {}).get("TASKSTREAM_HEALTH_PORT"))
            if port != health:
                problems.append(f"{job}: {host} serves /metrics on {health}, not {port}")
        elif port not in container_ports(svc):
            problems.append(f"{job}: {host} does not listen on {port}")
    for name in sorted(set(ours) - scraped):
        problems.append(f"{name} is not scraped")
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        if path != "/metrics" and any(h in ours for _, h, _ in scrape_targets({"scrape_configs": [job]})):
            problems.append(f"{job['job_name']}: taskstream serves /metrics, not {path}")
    return problems


def mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    found = {}
    for entry in svc.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        if source.startswith("."):
            found[target] = ROOT / source
    return found


def in_container(svc: dict[str, Any], path: str) -> Path:
    """The host file a container path of ``svc`` shows (through its bind mounts)."""
    for target, source in sorted(mounts(svc).items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target) :].lstrip("/")
    pytest.fail(f"{path} is not mounted from the repository")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = load_yaml(PROMETHEUS_CONFIG)
    broken["global"]["scrape_interval"] = "5 seconds"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(broken))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode != 0 and "5 seconds" in result.stdout + result.stderr


def test_prometheus_scrapes_every_taskstream_service_on_its_health_port() -> None:
    compose, config = load_compose(), load_yaml(PROMETHEUS_CONFIG)
    assert scrape_problems(compose, config) == []
    hosts = {host for _, host, _ in scrape_targets(config)}
    assert set(taskstream_services(compose)) <= hosts
    # negative controls: a mistyped target, a wrong port and a service left out are each caught
    typo = copy.deepcopy(config)
    typo["scrape_configs"][0]["static_configs"][0]["targets"] = ["wroker:8080"]
    assert "taskstream-worker: target wroker:8080 is not a compose service" in scrape_problems(compose, typo)
    assert "worker is not scraped" in scrape_problems(compose, typo)
    wrong_port = copy.deepcopy(compose)
    wrong_port["services"]["worker"]["environment"]["TASKSTREAM_HEALTH_PORT"] = "9100"
    assert scrape_problems(wrong_port, config) == ["taskstream-worker: worker serves /metrics on 9100, not 8080"]


def test_every_taskstream_service_serves_metrics_and_its_image_can() -> None:
    for name, svc in taskstream_services(load_compose()).items():
        assert svc["environment"].get("TASKSTREAM_HEALTH_PORT"), f"{name}: no /metrics without a health port"
        extras = set(svc["build"]["args"]["EXTRAS"].split(","))
        assert extras & {"metrics", "all"}, f"{name}: /metrics needs prometheus-client (the metrics extra)"


def test_prometheus_and_grafana_read_the_files_of_this_repository() -> None:
    compose = load_compose()
    prometheus, grafana = compose["services"]["prometheus"], compose["services"]["grafana"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    assert in_container(prometheus, flags["config.file"]) == PROMETHEUS_CONFIG
    assert in_container(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml") == DATASOURCES
    assert in_container(grafana, "/etc/grafana/provisioning/dashboards/taskstream.yml") == DASHBOARD_PROVIDERS
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert in_container(grafana, provider["options"]["path"]) / DASHBOARD.name == DASHBOARD
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container(grafana, home) == DASHBOARD
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "3000" in container_ports(grafana)
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_grafana_datasource_is_the_prometheus_service() -> None:
    compose = load_compose()
    config = load_yaml(DATASOURCES)
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and str(url.port) in container_ports(compose["services"]["prometheus"])
    assert source["jsonData"]["timeInterval"] == load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana's variables replaced) of every panel target."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know in {target['expr']}"
            queries.append((panel["title"], target["refId"], expr))
    return queries


def catalogued(series: str) -> tuple[str, tuple[str, ...]]:
    """(type, labels) of a series name the metrics catalogue defines (histograms by _bucket/_sum/_count)."""
    from taskstream.observe.metrics import METRICS

    if series in METRICS:
        kind, labels, _ = METRICS[series]
        return kind, labels
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and METRICS.get(base, ("",))[0] == "histogram":
            labels = METRICS[base][1]
            return ("counter", (*labels, "le")) if suffix == "_bucket" else ("counter", labels)
    raise AssertionError(f"{series} is not in taskstream.observe.metrics.METRICS")


def query_problems(expr: str, legend: str = "") -> list[str]:
    """What a dashboard query gets wrong about the catalogue: names, labels, rate() of a gauge, legend labels."""
    problems = []
    names = re.findall(r"\btaskstream_\w+", expr)
    if not names:
        return [f"{expr}: reads no taskstream metric"]
    known: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name in names:
        try:
            known[name] = catalogued(name)
        except AssertionError as exc:
            problems.append(str(exc))
    labels = {label for _, labels in known.values() for label in labels}
    for name, selector in re.findall(r"(taskstream_\w+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            if name in known and label not in known[name][1]:
                problems.append(f"{name} has no label {label!r}")
    grouped: set[str] = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        grouped |= {label.strip() for label in group.split(",") if label.strip()}
    problems += [f"{expr}: groups by {label!r}, which its metrics lack" for label in sorted(grouped - labels)]
    for name in re.findall(r"\b(?:rate|irate|increase)\((taskstream_\w+)", expr):
        if name in known and known[name][0] != "counter":
            problems.append(f"{expr}: rate() of the {known[name][0]} {name}")
    if "histogram_quantile" in expr and ("_bucket" not in expr or "le" not in grouped):
        problems.append(f"{expr}: histogram_quantile needs the _bucket series summed by le")
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if label not in grouped:
            problems.append(f"legend {legend!r}: {label!r} is not kept by the query")
    return problems


def test_query_problems_catches_what_it_should() -> None:
    good = 'sum by (queue) (rate(taskstream_messages_received_total{queue=~".*"}[1m]))'
    assert query_problems(good, "{{queue}}") == []
    assert query_problems(good.replace("received", "recieved"))  # a misspelt name
    assert query_problems(good.replace("by (queue)", "by (task)"))  # a label the metric lacks
    assert query_problems(good.replace("{queue=~", "{stage=~"))
    assert query_problems("rate(taskstream_queue_depth[1m])")  # rate of a gauge
    assert query_problems("histogram_quantile(0.5, sum by (queue) (rate(taskstream_task_run_seconds_bucket[1m])))")
    assert query_problems(good, "{{reason}}")
    assert query_problems("sum(rate(process_cpu_seconds_total[1m]))")


def test_dashboard_queries_use_only_catalogued_metrics_and_labels() -> None:
    dashboard = load_dashboard()
    problems = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            problems += [f"{panel['title']}: {p}" for p in query_problems(expr, target.get("legendFormat", ""))]
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((taskstream_\w+),\s*(\w+)\)", variable["definition"])
        assert match, f"variable {variable['name']}: {variable['definition']}"
        assert match.group(2) in catalogued(match.group(1))[1]
        assert variable["datasource"]["uid"] == load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert problems == []


def test_dashboard_has_the_panels_the_stack_needs() -> None:
    exprs = [expr for _, _, expr in dashboard_queries(load_dashboard())]

    def shown(*parts: str) -> bool:
        return any(all(part in expr for part in parts) for expr in exprs)

    for counter in ("received", "handled", "retried", "dead_lettered"):
        assert shown(f"rate(taskstream_messages_{counter}_total", "by (queue"), counter
    for histogram in ("taskstream_handler_duration_seconds", "taskstream_publish_duration_seconds"):
        assert shown("histogram_quantile(0.5,", histogram) and shown("histogram_quantile(0.95,", histogram)
    assert shown("taskstream_queue_depth") and shown("taskstream_dead_letter_depth")
    assert shown("rate(taskstream_tasks_finished_total", "status")
    for direction in ("in", "out"):
        assert shown(f"rate(taskstream_stream_records_{direction}_total", "step")


def test_dashboard_panels_read_the_provisioned_datasource_and_do_not_overlap() -> None:
    dashboard = load_dashboard()
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, title
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], title
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), title
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, title
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, title
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    def rules_file(queries: list[tuple[str, str, str]]) -> str:
        rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, _, expr) in enumerate(queries)]
        path = tmp_path / f"rules-{len(queries)}.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        return str(path)

    queries = dashboard_queries(load_dashboard())
    result = promtool("check", "rules", rules_file(queries))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    broken = [("broken", "A", "sum by (queue) (rate(taskstream_messages_received_total[1m])")]
    assert promtool("check", "rules", rules_file(broken)).returncode != 0
