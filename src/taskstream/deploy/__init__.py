"""``taskstream deploy systemd|cloud-init|k8s``: render what runs a worker or pipeline stages on VMs or Kubernetes.

Every renderer reads one :class:`DeploySpec` and runs the same command lines a user types (``taskstream worker
module:app``, ``taskstream pipeline run module:pipeline --stage NAME --replica I``), so what runs under
``docker compose``, systemd and Kubernetes is one thing configured three ways.

=============================  ===========================================================================
Command                        Renders
=============================  ===========================================================================
``deploy systemd``             one unit per stage (a template, instance = replica) or the worker's unit,
                               plus ``NAME.env.example``: the secrets file the units read (never the unit)
``deploy cloud-init``          a ``#cloud-config`` that installs taskstream in a venv, writes the app files
                               and the units, and enables and starts them
``deploy k8s``                 Deployments (one per stage replica, or one for the worker), secrets from a
                               Secret made from the same environment file
=============================  ===========================================================================

Example:
    taskstream deploy systemd stage examples.sensor_windows:pipeline --stage window=3 -o out/
    taskstream deploy k8s worker examples.endpoint:app --replicas 2 --health-port 8080 -- --concurrency 8

The verbs live in :mod:`taskstream.deploy.cli`; this package re-exports its :func:`register` (the ``taskstream``
CLI loads it as an extension) and the renderers.
"""

from __future__ import annotations

from taskstream.deploy.cli import build_spec, register, resolve_stages
from taskstream.deploy.cloudinit import default_requirements, render_cloud_init
from taskstream.deploy.k8s import manifests, render_k8s
from taskstream.deploy.spec import DeploySpec, DeployStage, parse_stage
from taskstream.deploy.systemd import env_file_template, render_systemd, render_unit

__all__ = [
    "DeploySpec",
    "DeployStage",
    "build_spec",
    "default_requirements",
    "env_file_template",
    "manifests",
    "parse_stage",
    "register",
    "render_cloud_init",
    "render_k8s",
    "render_systemd",
    "render_unit",
    "resolve_stages",
]
