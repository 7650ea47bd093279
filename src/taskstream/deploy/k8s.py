"""Kubernetes manifests: a Deployment per worker, or per pipeline stage replica.

A keyed stage replica owns a fixed share of the keys (``--replica I``), so each replica is its own Deployment
of one pod with the ``Recreate`` strategy: two pods never hold the same replica's window state at once. A worker
or an App is one Deployment with ``replicas: N`` (competing consumers). Secrets come from a Secret made from the
same environment file a VM uses (``kubectl create secret generic NAME-secrets --from-env-file=NAME.env``); the
manifests never hold them. Containers run as the image's non-root user with a read-only root file system; the
working directory (state, local outputs) is an ``emptyDir``.
"""

from __future__ import annotations

from typing import Any

from taskstream.deploy import yamlout
from taskstream.deploy.spec import DeploySpec, DeployStage, dns_label

__all__ = ["IMAGE_APP_DIR", "IMAGE_UID", "manifests", "render_k8s"]

IMAGE_UID = 10001  # the `taskstream` user of the project's Dockerfile
IMAGE_APP_DIR = "/app"  # where the Dockerfile puts the application code
_STATE_DIR = "/var/lib/taskstream"


def _labels(spec: DeploySpec, stage: DeployStage | None, replica: int | None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "taskstream",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": dns_label(stage.name) if stage else spec.kind,
    }
    if replica is not None:
        labels["taskstream/replica"] = str(replica)
    return labels


def _container(spec: DeploySpec, image: str, stage: DeployStage | None, replica: int | None) -> dict[str, Any]:
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": IMAGE_APP_DIR, **spec.plain_env()}
    container: dict[str, Any] = {
        "name": "taskstream",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": spec.command(stage, replica),
        "workingDir": _STATE_DIR,
        "envFrom": [{"secretRef": {"name": spec.secret_name}}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "state", "mountPath": _STATE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    if spec.health_port is not None:
        container["ports"] = [{"name": "health", "containerPort": spec.health_port, "protocol": "TCP"}]
        container["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        }
        container["readinessProbe"] = {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        }
    return container


def _deployment(
    spec: DeploySpec, image: str, namespace: str | None, stage: DeployStage | None, replica: int | None
) -> dict[str, Any]:
    labels = _labels(spec, stage, replica)
    metadata: dict[str, Any] = {"name": spec.object_name(stage, replica), "labels": labels}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1 if stage is not None else spec.replicas,
            "strategy": {"type": "Recreate"} if stage is not None else {"type": "RollingUpdate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": int(spec.shutdown_grace) + 15,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": IMAGE_UID,
                        "runAsGroup": IMAGE_UID,
                        "fsGroup": IMAGE_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [_container(spec, image, stage, replica)],
                    "volumes": [{"name": "state", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def manifests(spec: DeploySpec, *, image: str, namespace: str | None = None) -> list[dict[str, Any]]:
    """The Deployments as data (one per stage replica, or one for the worker)."""
    if spec.kind != "stage":
        return [_deployment(spec, image, namespace, None, None)]
    return [_deployment(spec, image, namespace, stage, i) for stage in spec.stages for i in stage.replicas]


def render_k8s(spec: DeploySpec, *, image: str, namespace: str | None = None) -> str:
    """The manifests as one multi-document YAML file, ready for ``kubectl apply -f``."""
    from taskstream import __version__

    ns = f" --namespace {namespace}" if namespace else ""
    header = (
        f"# Rendered by `taskstream deploy k8s` (taskstream {__version__}): deployment {spec.name!r}.\n"
        "# Secrets are not in this file. Create them once from the environment file, then apply:\n"
        f"#   kubectl{ns} create secret generic {spec.secret_name} --from-env-file={spec.name}.env\n"
        f"#   kubectl{ns} apply -f THIS_FILE\n"
    )
    return header + yamlout.dump_all(manifests(spec, image=image, namespace=namespace))
