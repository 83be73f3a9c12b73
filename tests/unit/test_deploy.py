"""deploy/: what can be checked without a container engine (none runs on this machine).

The compose file and the Kubernetes manifests parse, name every role, keep Redis on an
append-only file, give the executor no privileged mode, and set only settings the code reads.
"""

from __future__ import annotations

import re
import tomllib

import yaml

from bench.stack import ROOT

DEPLOY = ROOT / "deploy"
CONFIG_SOURCE = (ROOT / "infra" / "settings.py").read_text()
ROLES = {"api", "worker", "scheduler", "executor", "dashboard"}


def settings_named(env: dict[str, str] | list | None) -> set[str]:
    names = set(env) if isinstance(env, dict) else {e["name"] for e in env or [] if "name" in e}
    return {
        n for n in names if re.match(r"^(CRUCIBLE_|EXECUTOR_|SANDBOX_|CELERY_|REDIS_|LEGACY_|DASHBOARD_)", n)
    }


def test_compose_names_every_role_with_health_checks_and_known_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker", "scheduler", "executor-1", "executor-2", "dashboard"} <= set(services)
    assert "appendonly yes" in " ".join(map(str, services["redis"]["command"]))
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]  # --scale
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert service.get("privileged") is not True, name
        assert "resources" in service.get("deploy", {}), name
        for setting in settings_named(service.get("environment")):
            assert f'"{setting}"' in CONFIG_SOURCE, f"{name} sets {setting}, which the code never reads"


def test_kubernetes_manifests_cover_every_role_and_confine_the_executor() -> None:
    documents = [
        d for path in sorted(DEPLOY.glob("k8s/**/*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d
    ]
    workloads = {d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet")}
    assert {w.split("-")[-1] for w in workloads} >= ROLES | {"redis"}
    executor = next(w for n, w in workloads.items() if n.endswith("executor"))
    pod = executor["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False and not pod.get("hostNetwork")
    for container in pod["containers"]:
        assert container.get("securityContext", {}).get("privileged") is not True
    assert any(d["kind"] == "NetworkPolicy" for d in documents)
    for workload in workloads.values():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for setting in settings_named(container.get("env")):
                assert f'"{setting}"' in CONFIG_SOURCE, f"{setting} is never read by the code"
    config_maps = [d for d in documents if d["kind"] == "ConfigMap"]
    for config_map in config_maps:
        for setting in settings_named(config_map.get("data")):
            assert f'"{setting}"' in CONFIG_SOURCE, f"{setting} is never read by the code"


def test_the_image_copies_everything_the_project_installs() -> None:
    """The image pip-installs the project from copied sources: none may be missing."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY"))
    for pattern in setuptools["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"\b{package}\b", copied), f"package {package} is not copied into the image"
    for module in setuptools["py-modules"]:
        assert f"{module}.py" in copied, f"module {module} is not copied into the image"
    assert re.search(r"pip install \S*crucible-src", dockerfile)


def test_the_sentinel_override_adds_a_replica_and_three_sentinels_to_pieces_that_exist() -> None:
    base = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    override = yaml.safe_load((DEPLOY / "docker-compose.sentinel.yml").read_text())["services"]
    added = {name: s for name, s in override.items() if name not in base}
    assert set(added) == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert "--replicaof" in added["redis-replica"]["command"]
    for name, service in added.items():
        assert "healthcheck" in service and "resources" in service["deploy"], name
    for name, service in override.items():
        for setting in settings_named(service.get("environment")):
            assert f'"{setting}"' in CONFIG_SOURCE, f"{name} sets {setting}, which the code never reads"
    # every piece that talks to Redis finds the primary through the Sentinels
    talks = {n for n, s in base.items() if "REDIS_URL" in (s.get("environment") or {})}
    assert talks and talks <= {
        n for n, s in override.items() if "REDIS_SENTINELS" in (s.get("environment") or {})
    }
