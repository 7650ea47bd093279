"""systemd units for a worker or for pipeline stages on a VM.

Each unit runs one ``taskstream`` process from the host's virtual environment, restarts it on failure, stops it
with SIGTERM (in-flight work finishes or returns to the queue) and reads its secrets from an environment file
that only root can read. Stages are template units (``taskstream-NAME-STAGE@.service``) whose instance is the
replica index, so one VM runs ``@0 @1`` and another ``@2`` of the same file.
"""

from __future__ import annotations

import re
from importlib import resources
from string import Template

from taskstream.deploy.spec import DeploySpec, DeployStage

__all__ = ["env_file_template", "quote_exec_arg", "render_systemd", "render_unit"]

_REPLICA = "\0replica\0"  # stands for systemd's %i until quoting is done
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_./:=@+,%$-]+$")  # % and $ are escaped, not quoted


def _template() -> Template:
    return Template(resources.files("taskstream.deploy").joinpath("templates/unit.service").read_text("utf-8"))


def _escape(text: str) -> str:
    """Escape systemd specifiers (``%``) and, for ExecStart, variable expansion (``$``)."""
    return text.replace("%", "%%").replace("$", "$$")


def quote_exec_arg(arg: str) -> str:
    """One ExecStart word: specifiers and ``$`` escaped, quoted when it holds anything but safe characters.

    Example:
        >>> quote_exec_arg("--queues=a,b")
        '--queues=a,b'
        >>> quote_exec_arg("50%")
        '50%%'
        >>> quote_exec_arg("two words")
        '"two words"'
    """
    escaped = _escape(arg).replace(_escape(_REPLICA), "%i")
    if _SAFE_ARG.match(arg.replace(_REPLICA, "0")):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment_line(name: str, value: str) -> str:
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def render_unit(spec: DeploySpec, stage: DeployStage | None = None) -> str:
    """The unit file text for the worker (``stage=None``) or one stage of ``spec``."""
    from taskstream import __version__

    templated = stage is not None or spec.replicas > 1
    replica: str | None = _REPLICA if stage is not None else None
    argv = [f"{spec.venv}/bin/taskstream", *spec.command(stage, replica)]
    if stage is not None:
        description = f"taskstream pipeline {spec.target} stage {stage.name}, replica %i"
    else:
        description = f"taskstream {spec.kind} {spec.target}" + (", instance %i" if templated else "")
    user_lines = f"User={spec.user}\nGroup={spec.user}" if spec.user else "DynamicUser=yes"
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": spec.workdir, **spec.plain_env()}
    return _template().substitute(
        unit=spec.unit_name(stage),
        version=__version__,
        env_file=spec.env_file,
        instances=" ".join(spec.unit_instances(stage)),
        description=description.replace("%", "%%").replace("%%i", "%i"),
        user_lines=user_lines,
        environment="\n".join(_environment_line(k, v) for k, v in env.items()),
        exec_start=" ".join(quote_exec_arg(a) for a in argv),
        stop_timeout=int(spec.shutdown_grace) + 15,
        restart=spec.restart,
    )


def env_file_template(spec: DeploySpec) -> str:
    """A template of the secrets file, with placeholders (never real values)."""
    return (
        f"# Secrets of the taskstream deployment {spec.name!r}: only credentials belong here.\n"
        f"# Install on each host as {spec.env_file}, owned by root, mode 0600:\n"
        f"#   install -D -m 0600 -o root -g root {spec.name}.env {spec.env_file}\n"
        "# Kubernetes reads the same file:\n"
        f"#   kubectl create secret generic {spec.secret_name} --from-env-file={spec.name}.env\n"
        "TASKSTREAM_BROKER_URL=amqp://USER:PASSWORD@BROKER-HOST:5672/\n"
        "# TASKSTREAM_RESULT_STORE_URL=redis://:PASSWORD@REDIS-HOST:6379/0\n"
        "# TASKSTREAM_PAYLOAD_STORE_URL=s3://BUCKET/PREFIX (or azureblob://CONTAINER?connection_string=...)\n"
        "# TASKSTREAM_STATE_URL=redis://:PASSWORD@REDIS-HOST:6379/1\n"
        "# TASKSTREAM_SIGNING_KEY=a-long-random-string\n"
        "# AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...  AWS_DEFAULT_REGION=...  (SQS)\n"
    )


def render_systemd(spec: DeploySpec) -> dict[str, str]:
    """Every file a VM needs: one unit per stage (or the worker's unit) and the secrets-file template."""
    files = {spec.unit_name(stage): render_unit(spec, stage) for stage in spec.units()}
    files[f"{spec.name}.env.example"] = env_file_template(spec)
    return files
