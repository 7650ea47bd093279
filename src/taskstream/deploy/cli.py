"""The ``taskstream deploy systemd|cloud-init|k8s`` verbs: command-line values -> :class:`DeploySpec` -> files.

The three verbs share their arguments (what to run, its stages, name, replicas, settings, health port); each
command function reads them through :func:`_spec`, adds its own options and hands the spec to its renderer.
:func:`register` adds the verbs to the ``taskstream`` CLI (``taskstream.deploy`` re-exports it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from taskstream.deploy.cloudinit import check_env_file, render_cloud_init
from taskstream.deploy.k8s import render_k8s
from taskstream.deploy.spec import (
    DEFAULT_IMAGE,
    DEFAULT_VENV,
    DEFAULT_WORKDIR,
    DeploySpec,
    default_name,
    parse_env,
    parse_stage,
)
from taskstream.deploy.systemd import render_systemd
from taskstream.errors import ConfigurationError

__all__ = ["DeployKind", "build_spec", "cloud_init_cmd", "k8s_cmd", "register", "resolve_stages", "systemd_cmd"]


class DeployKind(enum.StrEnum):
    """What the deployed process runs."""

    worker = "worker"
    run = "run"
    stage = "stage"


def build_spec(
    kind: str,
    target: str,
    *,
    stages: Iterable[str] = (),
    name: str | None = None,
    replicas: int = 1,
    args: Iterable[str] = (),
    env: Iterable[str] = (),
    health_port: int | None = None,
    workdir: str = DEFAULT_WORKDIR,
    venv: str = DEFAULT_VENV,
    user: str | None = None,
    restart: str = "on-failure",
) -> DeploySpec:
    """A spec from command-line shaped values (what the three verbs share)."""
    if restart not in ("on-failure", "always"):
        raise ConfigurationError(f"restart must be on-failure or always, not {restart!r}")
    if kind == "stage":
        stages = resolve_stages(target, stages)
    return DeploySpec(
        kind=kind,  # type: ignore[arg-type]  # checked in DeploySpec
        target=target,
        name=name or default_name(target),
        stages=tuple(parse_stage(s) for s in stages),
        replicas=replicas,
        args=tuple(args),
        env=parse_env(env),
        health_port=health_port,
        workdir=workdir,
        venv=venv,
        user=user,
        restart=restart,  # type: ignore[arg-type]
    )


def pipeline_stages(target: str) -> dict[str, int] | None:
    """``{stage: parallelism}`` of the pipeline ``target`` names; ``None`` when its module is not importable here.

    Raises:
        ConfigurationError: ``target`` imports but is not a pipeline.
    """
    try:
        from taskstream.stream_ops.cli import load_pipeline
    except ImportError:  # stream pipelines are not part of this build
        return None
    try:
        plan = load_pipeline(target).plan()
    except ConfigurationError as exc:
        if "cannot import" in str(exc):
            return None
        raise
    return {name: stage.parallelism for name, stage in plan.stages.items()}


def resolve_stages(target: str, stages: Iterable[str]) -> list[str]:
    """The ``--stage`` values, checked against the pipeline; all its stages at full parallelism when none given."""
    given = [parse_stage(s) for s in stages]
    known = pipeline_stages(target)
    if known is None:
        if not given:
            raise ConfigurationError(
                f"cannot import {target!r} here to list its stages: name them with --stage NAME[=REPLICAS]"
            )
        typer.echo(f"note: {target} is not importable here; stage names are not checked", err=True)
        return list(stages)
    if not given:
        return [f"{name}={parallelism}" for name, parallelism in known.items()]
    for stage in given:
        if stage.name not in known:
            raise ConfigurationError(f"pipeline {target!r} has no stage {stage.name!r}; it has {', '.join(known)}")
        too_high = [i for i in stage.replicas if i >= known[stage.name]]
        if too_high:
            raise ConfigurationError(
                f"stage {stage.name!r} runs {known[stage.name]} replica(s) (0..{known[stage.name] - 1}); "
                f"no replica {too_high[0]}"
            )
    return list(stages)


def _spec(
    ctx: typer.Context,
    kind: DeployKind,
    target: str,
    stage: list[str] | None,
    name: str | None,
    replicas: int,
    env: list[str] | None,
    health_port: int | None,
    *,
    workdir: str = DEFAULT_WORKDIR,
    venv: str = DEFAULT_VENV,
    user: str | None = None,
    restart: str = "on-failure",
) -> DeploySpec:
    """The spec from the arguments every verb takes, as the verb received them, and the options some verbs add.

    The arguments after ``--`` (``ctx.args``) are appended to the taskstream command line.
    """
    return build_spec(
        kind.value,
        target,
        stages=stage or (),
        name=name,
        replicas=replicas,
        args=ctx.args,
        env=env or (),
        health_port=health_port,
        workdir=workdir,
        venv=venv,
        user=user,
        restart=restart,
    )


def _emit(files: dict[str, str], output: Path | None) -> None:
    if output is None:
        many = len(files) > 1
        for filename, text in files.items():
            if many:
                typer.echo(f"# ==> {filename} <==")
            typer.echo(text, nl=False)
        return
    output.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        path = output / filename
        path.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {path}", err=True)


def _read_includes(paths: Iterable[Path]) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in paths:
        if path.is_absolute() or ".." in path.parts:
            raise ConfigurationError(f"--include wants a path relative to the current directory, got {str(path)!r}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            found = [path]
        else:
            raise ConfigurationError(f"--include {str(path)!r}: no such file or directory")
        for file in found:
            try:
                files[file.as_posix()] = file.read_text("utf-8")
            except UnicodeDecodeError:
                raise ConfigurationError(f"--include {file.as_posix()!r} is not UTF-8 text") from None
    return files


def _read_secrets(secrets_file: Path | None) -> str | None:
    if secrets_file is None:
        return None
    try:
        return check_env_file(secrets_file.read_text("utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read --secrets-file {str(secrets_file)!r}: {exc.strerror}") from None


KindArg = Annotated[DeployKind, typer.Argument(help="worker (taskstream worker), run (taskstream run) or stage.")]
TargetArg = Annotated[str, typer.Argument(help="module:attribute of the App or pipeline.")]
StageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--stage",
        help="Stage to run: NAME, NAME=REPLICAS or NAME@I,J (replica indices); repeatable. "
        "Default: every stage of the pipeline at its parallelism.",
    ),
]
NameOpt = Annotated[str | None, typer.Option(help="Deployment name (default: the module's name).")]
ReplicasOpt = Annotated[int, typer.Option(help="Identical worker processes (worker and run kinds).")]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", help="A non-secret setting KEY=VALUE (repeatable); secrets go in the environment file."),
]
HealthOpt = Annotated[int | None, typer.Option(help="Serve /healthz and /readyz on this port (worker and run).")]
RestartOpt = Annotated[str, typer.Option(help="on-failure or always.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write files into this directory.")]
WorkdirOpt = Annotated[str, typer.Option(help="Application code on the host.")]
VenvOpt = Annotated[str, typer.Option(help="Virtual environment holding taskstream.")]
RequirementOpt = Annotated[
    list[str] | None,
    typer.Option("--requirement", "-r", help="pip requirement for the VM (repeatable; default taskstream)."),
]
IncludeOpt = Annotated[
    list[Path] | None,
    typer.Option(help="Application file or directory (*.py) to copy to the VM, relative path kept."),
]
SecretsOpt = Annotated[
    Path | None,
    typer.Option(help="Local environment file embedded as the VM's secrets (user data is not secret!)."),
]
ImageOpt = Annotated[str | None, typer.Option(help="Container image (default taskstream:VERSION).")]
NamespaceOpt = Annotated[str | None, typer.Option(help="Namespace of the objects.")]


def systemd_cmd(
    ctx: typer.Context,
    kind: KindArg,
    target: TargetArg,
    stage: StageOpt = None,
    name: NameOpt = None,
    replicas: ReplicasOpt = 1,
    env: EnvOpt = None,
    health_port: HealthOpt = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    venv: VenvOpt = DEFAULT_VENV,
    user: Annotated[str | None, typer.Option(help="Fixed system user (default: a dynamic user).")] = None,
    restart: RestartOpt = "on-failure",
    output: OutputOpt = None,
) -> None:
    """systemd units (restart policy, secrets in an environment file) and the secrets-file template.

    Arguments after `--` are appended to the taskstream command line.
    """
    spec = _spec(
        ctx,
        kind,
        target,
        stage,
        name,
        replicas,
        env,
        health_port,
        workdir=workdir,
        venv=venv,
        user=user,
        restart=restart,
    )
    _emit(render_systemd(spec), output)


def cloud_init_cmd(
    ctx: typer.Context,
    kind: KindArg,
    target: TargetArg,
    stage: StageOpt = None,
    name: NameOpt = None,
    replicas: ReplicasOpt = 1,
    env: EnvOpt = None,
    health_port: HealthOpt = None,
    requirement: RequirementOpt = None,
    include: IncludeOpt = None,
    secrets_file: SecretsOpt = None,
    user: Annotated[str | None, typer.Option(help="Fixed system user, created on the VM.")] = None,
    restart: RestartOpt = "on-failure",
    output: OutputOpt = None,
) -> None:
    """A #cloud-config that installs taskstream, writes the app and its units, and starts them.

    Arguments after `--` are appended to the taskstream command line.
    """
    spec = _spec(ctx, kind, target, stage, name, replicas, env, health_port, user=user, restart=restart)
    secrets = _read_secrets(secrets_file)
    text = render_cloud_init(
        spec, requirements=requirement or None, files=_read_includes(include or ()), secrets=secrets
    )
    _emit({f"{spec.name}.cloud-init.yaml": text}, output)


def k8s_cmd(
    ctx: typer.Context,
    kind: KindArg,
    target: TargetArg,
    stage: StageOpt = None,
    name: NameOpt = None,
    replicas: ReplicasOpt = 1,
    env: EnvOpt = None,
    health_port: HealthOpt = None,
    image: ImageOpt = None,
    namespace: NamespaceOpt = None,
    output: OutputOpt = None,
) -> None:
    """Kubernetes Deployments: one per stage replica, or one for the worker with N replicas.

    Arguments after `--` are appended to the taskstream command line.
    """
    from taskstream import __version__

    spec = _spec(ctx, kind, target, stage, name, replicas, env, health_port)
    text = render_k8s(spec, image=image or DEFAULT_IMAGE.format(version=__version__), namespace=namespace)
    _emit({f"{spec.name}.k8s.yaml": text}, output)


def register(cli: typer.Typer) -> None:
    """Add ``taskstream deploy systemd|cloud-init|k8s`` to the CLI."""
    deploy = typer.Typer(
        help="Render what runs a worker or pipeline stages: systemd units, cloud-init, Kubernetes manifests.",
        no_args_is_help=True,
    )
    extra = {"allow_extra_args": True}
    deploy.command("systemd", context_settings=extra)(systemd_cmd)
    deploy.command("cloud-init", context_settings=extra)(cloud_init_cmd)
    deploy.command("k8s", context_settings=extra)(k8s_cmd)
    cli.add_typer(deploy, name="deploy")
