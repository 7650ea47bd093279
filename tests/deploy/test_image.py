"""The Dockerfile and .dockerignore, checked without a Docker engine.

The instructions are read and held to what the rest of the project assumes (slim base, user 10001 as the
Kubernetes manifests say, entry point ``taskstream``, extras that exist); the build context is computed from
.dockerignore the way Docker does, and the image's install step is replayed on exactly that context: the wheel
it builds must carry the package data ``taskstream deploy`` needs and the ``taskstream`` script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from taskstream.deploy.k8s import IMAGE_APP_DIR, IMAGE_UID

from .conftest import ROOT


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in steps:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        patterns.append((negate, pattern.strip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories; ``**`` spans directories."""
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    regex = regex.replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts)))


def in_context(path: str, patterns: list[tuple[bool, str]]) -> bool:
    included = True
    for negate, pattern in patterns:
        if _matches(pattern, path):
            included = negate
    return included


def build_context() -> list[str]:
    patterns = dockerignore_patterns()
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return sorted(f for f in files if (ROOT / f).is_file() and in_context(f, patterns))


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = [(False, "*"), (True, "src"), (False, "**/__pycache__")]
    assert in_context("src/taskstream/app.py", patterns)
    assert not in_context("src/taskstream/__pycache__/app.cpython-311.pyc", patterns)
    assert not in_context(".venv/bin/python", patterns)


def test_dockerfile_shape() -> None:
    steps = instructions(ROOT / "Dockerfile")
    build, final = stages(steps)
    args = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest)

    # Slim base, a Python the package supports.
    assert all(rest.startswith("python:${PYTHON_VERSION}-slim") for keyword, rest in steps if keyword == "FROM")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, args["PYTHON_VERSION"].split("."))) >= tuple(map(int, minimum.split(".")))

    # Extras by build argument, each one real.
    extras = args["EXTRAS"].split(",")
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])
    assert any('".${EXTRAS:+[$EXTRAS]}"' in rest for keyword, rest in build if keyword == "RUN")

    # Non-root user, the uid the Kubernetes manifests run as; entry point taskstream.
    final_map = {keyword: rest for keyword, rest in final}
    assert final_map["USER"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert f"--uid {IMAGE_UID}" in final_map["RUN"]
    assert json.loads(final_map["ENTRYPOINT"]) == ["taskstream"]
    env = final_map["ENV"]
    assert f"PYTHONPATH={IMAGE_APP_DIR}" in env
    assert "PATH=/opt/taskstream/venv/bin:$PATH" in env


def test_copy_sources_are_in_the_build_context() -> None:
    context = build_context()
    patterns = dockerignore_patterns()
    for keyword, rest in instructions(ROOT / "Dockerfile"):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _destination = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert in_context(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
    assert "src/taskstream/deploy/templates/unit.service" in context
    assert "examples/__init__.py" in context
    for private in (".venv/", ".git/", ".services/", "tests/", "benchmarks/"):
        assert not any(f.startswith(private) for f in context), private
    assert not any("__pycache__" in f for f in context)


def test_the_install_step_on_the_build_context_gives_a_complete_wheel(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for relative in build_context():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("taskstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "taskstream/deploy/templates/unit.service" in names
    assert "taskstream/py.typed" in names
    assert "taskstream/health.py" in names
    assert "taskstream = taskstream.cli:main" in scripts


@pytest.mark.slow
def test_every_compose_service_target_loads_in_the_image_install(tmp_path: Path) -> None:
    """Replay the image: install the build context with the Dockerfile's default EXTRAS into a fresh venv, copy
    the application code where the image puts it, and load every compose service's target there (this catches
    an import the dev extras hide, such as numpy in a module a service needs)."""
    from .test_compose import load_compose, taskstream_services

    steps = instructions(ROOT / "Dockerfile")
    extras = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest)["EXTRAS"]
    context = tmp_path / "context"
    for relative in build_context():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{context}[{extras}]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    app_dir = tmp_path / "app"  # COPY examples /app/examples
    (final_copy,) = [rest for keyword, rest in stages(steps)[-1] if keyword == "COPY" and not rest.startswith("--")]
    source, destination = final_copy.split()
    assert destination == f"{IMAGE_APP_DIR}/{source}"
    shutil.copytree(context / source, app_dir / source)

    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "PYTHONPATH": str(app_dir), "HOME": str(tmp_path)}
    probe = (
        "import sys; from taskstream.cli import load_object; from taskstream.app import App; "
        "obj = load_object(sys.argv[1]); assert isinstance(obj, App), type(obj)"
    )
    for name, svc in taskstream_services(load_compose()).items():
        command = svc["command"]
        if command[:2] == ["pipeline", "run"]:
            argv = [str(venv / "bin" / "taskstream"), "pipeline", "stages", command[2]]
        else:
            argv = [str(venv / "bin" / "python"), "-c", probe, command[1]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
