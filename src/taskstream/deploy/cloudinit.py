"""A cloud-init ``#cloud-config`` that turns a fresh VM into a taskstream worker or stage host.

On first boot the VM installs Python's venv support, creates a virtual environment with taskstream (and the
application's own requirements), writes the application files and the systemd units rendered by
:mod:`taskstream.deploy.systemd`, and enables and starts them. Secrets are written only when given (from a local
environment file) into a root-only file; a VM booted without them waits, its units skipped, until an operator
writes the file and starts the units. User data is readable by anything on the VM that can reach the cloud's
metadata service, so pass secrets this way only where that is acceptable; otherwise deliver the environment file
with your secrets manager.

Needs an image with Python 3.11 or newer as ``python3`` (Debian 12, Ubuntu 24.04 and later).
"""

from __future__ import annotations

import base64
import gzip
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from taskstream.deploy import yamlout
from taskstream.deploy.spec import DeploySpec
from taskstream.deploy.systemd import render_unit
from taskstream.errors import ConfigurationError

__all__ = ["check_env_file", "default_requirements", "render_cloud_init"]

_ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$")


def _gz_b64(text: str) -> str:
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def default_requirements(extras: str = "rabbitmq,sqs,azure") -> list[str]:
    """taskstream pinned to this version, with the broker extras a VM usually needs."""
    from taskstream import __version__

    return [f"taskstream[{extras}]=={__version__}" if extras else f"taskstream=={__version__}"]


def check_env_file(text: str) -> str:
    """Check that ``text`` is a systemd environment file (``KEY=VALUE`` lines and comments); return it.

    The error names the offending line number, never its content (it may hold a secret).
    """
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", ";")) and not _ENV_LINE.match(stripped):
            raise ConfigurationError(f"environment file line {number} is not KEY=VALUE or a comment")
    return text if text.endswith("\n") else text + "\n"


def _app_files(spec: DeploySpec, files: Mapping[str, str]) -> list[dict[str, Any]]:
    """``write_files`` entries of the application files, gzip+base64 encoded under ``spec.workdir``."""
    entries: list[dict[str, Any]] = []
    for relative, content in sorted(files.items()):
        if relative.startswith("/") or ".." in relative.split("/"):
            raise ConfigurationError(f"application file paths must be relative and stay inside, got {relative!r}")
        entries.append(
            {
                "path": f"{spec.workdir}/{relative}",
                "permissions": "0644",
                "encoding": "gz+b64",  # user data is small (16 KiB on EC2): code travels compressed
                "content": _gz_b64(content),
            }
        )
    return entries


def _unit_files(spec: DeploySpec) -> list[dict[str, Any]]:
    """``write_files`` entries of the systemd units."""
    return [
        {
            "path": f"/etc/systemd/system/{spec.unit_name(stage)}",
            "permissions": "0644",
            "content": render_unit(spec, stage),
        }
        for stage in spec.units()
    ]


def _install_script(spec: DeploySpec, requirements: Sequence[str]) -> str:
    """The shell line that checks Python, makes the venv, installs ``requirements`` and makes the directories."""
    venv = spec.venv
    return "; ".join(
        [
            "set -eu",
            'python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"'
            " || { echo 'taskstream needs Python 3.11 or newer as python3' >&2; exit 1; }",
            f"python3 -m venv {shlex.quote(venv)}",
            f"{shlex.quote(venv)}/bin/pip install --quiet --no-cache-dir --upgrade pip",
            f"{shlex.quote(venv)}/bin/pip install --quiet --no-cache-dir " + " ".join(map(shlex.quote, requirements)),
            f"mkdir -p {shlex.quote(spec.workdir)} {shlex.quote(spec.env_dir)}",
            f"chmod 0700 {shlex.quote(spec.env_dir)}",
        ]
    )


def _system_user(name: str) -> list[Any]:
    """``users`` entries: the image's default user and a locked system user ``name`` without a home."""
    return [
        "default",
        {"name": name, "system": True, "shell": "/usr/sbin/nologin", "lock_passwd": True, "no_create_home": True},
    ]


def _header(spec: DeploySpec) -> str:
    from taskstream import __version__

    return (
        "#cloud-config\n"
        f"# Rendered by `taskstream deploy cloud-init` (taskstream {__version__}): deployment {spec.name!r}.\n"
        "# Check: cloud-init schema --config-file THIS_FILE\n"
    )


def render_cloud_init(
    spec: DeploySpec,
    *,
    requirements: Sequence[str] | None = None,
    files: Mapping[str, str] | None = None,
    secrets: str | None = None,
) -> str:
    """The cloud-config text.

    Args:
        spec: what to run.
        requirements: pip requirements installed into the VM's venv (taskstream itself by default).
        files: application files, path relative to ``spec.workdir`` -> text content (written gzip+base64
            encoded, as user data is small: 16 KiB on EC2).
        secrets: content of the environment file (``KEY=VALUE`` lines); ``None`` leaves it to the operator.
    """
    requirements = list(requirements) if requirements else default_requirements()
    write_files = _app_files(spec, files or {}) + _unit_files(spec)
    if secrets is not None:
        write_files.append(
            {"path": spec.env_file, "owner": "root:root", "permissions": "0600", "content": check_env_file(secrets)}
        )
    instances = [name for stage in spec.units() for name in spec.unit_instances(stage)]
    document: dict[str, Any] = {
        "package_update": True,
        "packages": ["python3", "python3-venv", "python3-pip"],
    }
    if spec.user:
        document["users"] = _system_user(spec.user)
    document["write_files"] = write_files
    document["runcmd"] = [
        ["sh", "-c", _install_script(spec, requirements)],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", *instances],
    ]
    waiting = "" if secrets is not None else f"; write {spec.env_file} (mode 0600), then systemctl start them"
    document["final_message"] = f"taskstream {spec.name}: enabled {' '.join(instances)}{waiting}"
    return _header(spec) + yamlout.dump(document)
