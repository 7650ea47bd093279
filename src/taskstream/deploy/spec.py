"""What to deploy: one worker, one App, or the stages of a pipeline, and the settings it runs with.

A :class:`DeploySpec` is what every renderer (systemd, cloud-init, Kubernetes) reads. It knows the command line
each process runs (the same ``taskstream`` verbs a user types, or a compose service runs), which environment
variables are plain settings and which are secrets, and how stage replicas are named.

Secrets never go into rendered units or manifests: every URL setting (``TASKSTREAM_BROKER_URL``,
``TASKSTREAM_RESULT_STORE_URL``, ``TASKSTREAM_PAYLOAD_STORE_URL``, ``TASKSTREAM_STATE_URL``: any of them may carry a
password, an account key or a SAS token), ``TASKSTREAM_SIGNING_KEY``, any name that looks like a key, password,
token or connection string, and any value holding a password or a query option not known to be harmless
(:func:`~taskstream.settings.redact_url` would hide it) belong in the environment file (systemd, cloud-init) or
the Secret (Kubernetes).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from taskstream.errors import ConfigurationError
from taskstream.health import HEALTH_ENV_VARS
from taskstream.settings import URL_SETTINGS, Settings, env_name, redact_url

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_WORKDIR",
    "KNOWN_ENV_VARS",
    "OTHER_ENV_VARS",
    "SECRET_ENV_VARS",
    "DeploySpec",
    "DeployStage",
    "Kind",
    "default_name",
    "dns_label",
    "is_secret_env",
    "parse_env",
    "parse_stage",
]

Kind = Literal["worker", "run", "stage"]

DEFAULT_WORKDIR = "/opt/taskstream/app"
DEFAULT_VENV = "/opt/taskstream/venv"
DEFAULT_ENV_DIR = "/etc/taskstream"
DEFAULT_IMAGE = "taskstream:{version}"

#: ``TASKSTREAM_*`` variables that carry credentials (every URL setting, the signing key): never in a unit or a
#: manifest.
SECRET_ENV_VARS: frozenset[str] = frozenset({env_name(field) for field in URL_SETTINGS} | {"TASKSTREAM_SIGNING_KEY"})
_SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN", "CONNECTION_STRING", "CREDENTIAL", "SAS")

#: ``TASKSTREAM_*`` variables read outside :class:`~taskstream.settings.Settings`, with where they are read.
OTHER_ENV_VARS: dict[str, str] = {**HEALTH_ENV_VARS}

#: Every ``TASKSTREAM_*`` variable taskstream reads: the Settings fields and the documented extras.
KNOWN_ENV_VARS: frozenset[str] = frozenset(
    {f"TASKSTREAM_{name.upper()}" for name in Settings.model_fields} | set(OTHER_ENV_VARS)
)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(:[A-Za-z_][A-Za-z0-9_.]*)?$")

#: The verbs whose processes can serve ``/healthz`` and ``/readyz`` (``TASKSTREAM_HEALTH_PORT``).
HEALTH_KINDS: frozenset[str] = frozenset({"worker", "run"})


def is_secret_env(name: str) -> bool:
    """True when ``name`` is (or looks like) a variable that carries a credential."""
    upper = name.upper()
    return upper in SECRET_ENV_VARS or any(word in upper for word in _SECRET_WORDS)


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` settings for a unit or manifest, refusing secrets and unknown ``TASKSTREAM_*`` names.

    Raises:
        ConfigurationError: malformed pair, secret variable, or a ``TASKSTREAM_*`` name taskstream does not read.
    """
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ConfigurationError(f"--env wants KEY=VALUE, got {pair.split('=', 1)[0]!r}...")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ConfigurationError(f"the value of {name} must be one line")
        if is_secret_env(name):
            raise ConfigurationError(
                f"{name} carries a credential: put it in the environment file (systemd, cloud-init) or the "
                "Kubernetes Secret, never in a unit or a manifest"
            )
        if redact_url(value) != value:
            raise ConfigurationError(
                f"the value of {name} holds a credential: put it in the environment file or the Kubernetes Secret"
            )
        if name.startswith("TASKSTREAM_") and name not in KNOWN_ENV_VARS:
            close = difflib.get_close_matches(name, sorted(KNOWN_ENV_VARS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigurationError(f"taskstream reads no variable {name}{hint}")
        env[name] = value
    return env


@dataclass(frozen=True, slots=True)
class DeployStage:
    """One pipeline stage and the replica indices to run of it.

    Attributes:
        name: the stage name (``taskstream pipeline run ... --stage NAME``).
        replicas: replica indices (``--replica I``) to run here.
    """

    name: str
    replicas: tuple[int, ...] = (0,)


def parse_stage(text: str) -> DeployStage:
    """Parse ``NAME`` (replica 0), ``NAME=N`` (replicas 0..N-1) or ``NAME@I,J`` (exactly those replicas).

    Example:
        >>> parse_stage("window=3")
        DeployStage(name='window', replicas=(0, 1, 2))
        >>> parse_stage("window@2")
        DeployStage(name='window', replicas=(2,))
    """
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:=(\d+)|@(\d+(?:,\d+)*))?", text.strip())
    if match is None:
        raise ConfigurationError(f"--stage wants NAME, NAME=REPLICAS or NAME@I,J; got {text!r}")
    name, count, indices = match.groups()
    if count is not None:
        if int(count) < 1:
            raise ConfigurationError(f"stage {name!r} needs at least one replica, got {count}")
        return DeployStage(name, tuple(range(int(count))))
    if indices is not None:
        return DeployStage(name, tuple(sorted({int(i) for i in indices.split(",")})))
    return DeployStage(name)


def default_name(target: str) -> str:
    """A deployment name from ``module:attribute``: the module's last part, as a DNS label."""
    module = target.partition(":")[0].rsplit(".", 1)[-1]
    name = re.sub(r"[^a-z0-9]+", "-", module.lower()).strip("-")
    return name[:40].strip("-") or "app"


def dns_label(text: str) -> str:
    """``text`` as a lowercase DNS label part (letters, digits, ``-``)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


@dataclass(frozen=True)
class DeploySpec:
    """Everything the renderers need about one deployment.

    Attributes:
        kind: ``worker`` (``taskstream worker``), ``run`` (``taskstream run``) or ``stage``
            (``taskstream pipeline run --stage NAME --replica I``).
        target: ``module:attribute`` of the App or pipeline.
        name: deployment name (DNS label); unit, file and object names derive from it.
        stages: for ``stage``: the stages and replicas to run.
        replicas: for ``worker``/``run``: identical processes (competing consumers).
        args: extra arguments appended to the taskstream command line.
        env: plain (non-secret) settings.
        health_port: port of the health server (``worker``/``run`` only); ``None`` for none.
        workdir: where the application code lives on the host (on ``PYTHONPATH``).
        venv: the virtual environment holding taskstream on the host.
        env_dir: directory of the environment files holding secrets.
        user: fixed system user; ``None`` runs under a systemd dynamic user.
        restart: systemd restart policy.
        shutdown_grace: seconds in-flight work may take to finish on stop.
    """

    kind: Kind
    target: str
    name: str
    stages: tuple[DeployStage, ...] = ()
    replicas: int = 1
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health_port: int | None = None
    workdir: str = DEFAULT_WORKDIR
    venv: str = DEFAULT_VENV
    env_dir: str = DEFAULT_ENV_DIR
    user: str | None = None
    restart: Literal["on-failure", "always"] = "on-failure"
    shutdown_grace: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in ("worker", "run", "stage"):
            raise ConfigurationError(f"kind must be worker, run or stage, not {self.kind!r}")
        if not _TARGET.match(self.target):
            raise ConfigurationError(f"target must look like module:attribute, got {self.target!r}")
        if not _NAME.match(self.name):
            raise ConfigurationError(
                f"name {self.name!r} must be 1-40 lowercase letters, digits or '-', starting and ending alphanumeric"
            )
        if self.kind == "stage" and not self.stages:
            raise ConfigurationError("a pipeline deployment needs its stages: --stage NAME[=REPLICAS] (repeatable)")
        if self.kind != "stage" and self.stages:
            raise ConfigurationError(f"--stage is for pipelines (kind 'stage'), not for kind {self.kind!r}")
        if len({s.name for s in self.stages}) != len(self.stages):
            raise ConfigurationError("each stage may be named once")
        if self.replicas < 1:
            raise ConfigurationError(f"replicas must be at least 1, got {self.replicas}")
        if self.health_port is not None and not 1 <= self.health_port <= 65535:
            raise ConfigurationError(f"health port must be between 1 and 65535, got {self.health_port}")
        if self.health_port is not None and self.kind not in HEALTH_KINDS:
            raise ConfigurationError(
                f"kind {self.kind!r} serves no health endpoint; --health-port is for {', '.join(sorted(HEALTH_KINDS))}"
            )
        for path in (self.workdir, self.venv, self.env_dir):
            if not path.startswith("/") or any(c.isspace() for c in path):
                raise ConfigurationError(f"paths must be absolute and without spaces, got {path!r}")
        parse_env(f"{k}={v}" for k, v in self.env.items())  # the same checks whatever built the spec

    # -- names ------------------------------------------------------------------------------------------

    @property
    def env_file(self) -> str:
        """The secrets file on the host (``KEY=VALUE`` lines, root-only)."""
        return f"{self.env_dir}/{self.name}.env"

    @property
    def secret_name(self) -> str:
        """The Kubernetes Secret that holds the same variables as the environment file."""
        return f"{self.name}-secrets"

    def unit_name(self, stage: DeployStage | None = None) -> str:
        """The systemd unit file name; stages and replicated workers are templates (``@.service``)."""
        if stage is not None:
            return f"taskstream-{self.name}-{dns_label(stage.name)}@.service"
        if self.replicas > 1:
            return f"taskstream-{self.name}@.service"
        return f"taskstream-{self.name}.service"

    def unit_instances(self, stage: DeployStage | None = None) -> list[str]:
        """The unit names to enable: one per replica for templates."""
        unit = self.unit_name(stage)
        if stage is not None:
            return [unit.replace("@.", f"@{i}.") for i in stage.replicas]
        if self.replicas > 1:
            return [unit.replace("@.", f"@{i}.") for i in range(self.replicas)]
        return [unit]

    def units(self) -> list[DeployStage | None]:
        """One entry per unit to render: each stage, or ``None`` for the single worker/run unit."""
        return list(self.stages) if self.kind == "stage" else [None]

    def object_name(self, stage: DeployStage | None = None, replica: int | None = None) -> str:
        """Kubernetes object name of a stage replica (or of the worker)."""
        parts = [self.name]
        if stage is not None:
            parts.append(dns_label(stage.name))
        if replica is not None:
            parts.append(str(replica))
        return "-".join(parts)[:63].strip("-")

    # -- command lines ----------------------------------------------------------------------------------

    def command(self, stage: DeployStage | None = None, replica: str | int | None = None) -> list[str]:
        """The taskstream arguments (after the ``taskstream`` program) one process runs."""
        if self.kind == "worker":
            argv = ["worker", self.target]
        elif self.kind == "run":
            argv = ["run", self.target]
        else:
            if stage is None or replica is None:
                raise ConfigurationError("a stage process needs its stage and replica")
            argv = ["pipeline", "run", self.target, "--stage", stage.name, "--replica", str(replica)]
        return [*argv, *self.args]

    def plain_env(self) -> dict[str, str]:
        """The non-secret variables a unit or manifest may carry."""
        env = dict(self.env)
        if self.health_port is not None:
            env["TASKSTREAM_HEALTH_PORT"] = str(self.health_port)
        return env
