"""docs/deploy.md: every `taskstream deploy` command it shows runs as written and renders valid files."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT, require_tool
from .test_compose import load_compose, taskstream_services

DOC = ROOT / "docs" / "deploy.md"


def shell_lines() -> list[str]:
    """The doc's shell code blocks as logical lines (continuations joined, comments dropped)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            if full and not full.startswith("#"):
                lines.append(full)
    return lines


def test_every_deploy_command_in_the_guide_runs(tmp_path: Path) -> None:
    variables = {}
    commands = []
    for line in shell_lines():
        assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        elif line.startswith("taskstream deploy "):
            commands.append(line)
    assert len(commands) >= 5, commands
    (tmp_path / "sensors.env").write_text("TASKSTREAM_BROKER_URL=amqp://sensors:pw@10.0.0.5:5672/sensors\n")
    for command in commands:
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        argv = shlex.split(command.split("#", 1)[0])
        argv = [a if not a.endswith("sensors.env") else str(tmp_path / "sensors.env") for a in argv]
        argv = [str(tmp_path / a) if a.endswith("/") and not a.startswith("/") else a for a in argv]
        result = subprocess.run(
            [sys.executable, "-m", "taskstream.cli", *argv[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"

    cloud_init = require_tool("cloud-init")
    rendered = sorted(tmp_path.rglob("*.cloud-init.yaml"))
    assert [p.parent.name for p in rendered] == ["vm-a", "vm-b"]
    for path in rendered:
        check = subprocess.run([cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        enabled = yaml.safe_load(path.read_text())["runcmd"][-1][3:]
        assert all(unit.startswith("taskstream-sensors-") for unit in enabled)
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == ["sensors.k8s.yaml", "tasks.k8s.yaml"]


def test_the_guide_names_every_compose_service() -> None:
    text = DOC.read_text()
    for name in load_compose()["services"]:
        base = re.sub(r"-\d+$", "", name)
        assert f"`{name}`" in text or f"`{base}-" in text, f"docs/deploy.md does not mention the service {name}"
    for svc in taskstream_services(load_compose()).values():
        assert " ".join(svc["command"][:3]) in text
