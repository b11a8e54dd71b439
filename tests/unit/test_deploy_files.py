"""The deployment files: docker-compose.yml parses for each profile, every Kubernetes manifest
validates against the API schemas, and the invariants the design relies on hold.

Offline: Debian's `docker-compose` (1.29) runs `config` without a Docker engine (.ci/run
installs it), and `kubernetes-validate` carries the schemas of each Kubernetes release.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S_DIR = ROOT / "deploy" / "k8s"
# A release recent clusters run; strict mode refuses any field the schema does not know.
K8S_VERSION = "1.31.0"

# Compose services that run once and exit (no healthcheck; others wait for their success).
ONE_SHOT = {"create-bucket", "migrate", "init-volumes", "models-init"}
# Set by docker-compose.yml itself (wiring), so not needed in .env.example.
WIRED_SETTINGS = {
    "LORAPLEX_DATABASE_URL",
    "LORAPLEX_BROKER_URL",
    "LORAPLEX_DATA_DIR",
    "LORAPLEX_ADAPTER_CACHE_DIR",
    "LORAPLEX_GATEWAY_URL",
    "LORAPLEX_REPLICA_MAX_ADAPTERS",
    "LORAPLEX_MAX_LORA_RANK",  # compose: from VLLM_MAX_LORA_RANK
    "LORAPLEX_HOST",
    "LORAPLEX_PORT",
    "LORAPLEX_WORKER_ID",
    "LORAPLEX_WORK_DIR",
    "LORAPLEX_FORWARDED_ALLOW_IPS",  # compose: only nginx reaches the API
}
ADAPTER_CACHE_ENV = "LORAPLEX_ADAPTER_CACHE_DIR"


# --------------------------------------------------------------------------- compose ----


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail(
            "`docker-compose` is not on PATH: install Debian's package "
            "(`apt-get install -y docker-compose`; .ci/run does this) to validate "
            "docker-compose.yml offline"
        )
    return found


@pytest.fixture(scope="module")
def compose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding docker-compose.yml and a `.env` made from `.env.example`
    (the repository's own `.env`, if any, is never read or written)."""
    folder = tmp_path_factory.mktemp("compose")
    shutil.copy(COMPOSE_FILE, folder / "docker-compose.yml")
    (folder / ".env").write_text(_filled_in(ENV_EXAMPLE.read_text()))
    (folder / "deploy").symlink_to(ROOT / "deploy", target_is_directory=True)
    return folder


def _compose(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Only PATH and HOME: a variable of the caller's environment would override .env.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder)}
    return subprocess.run(
        [_docker_compose(), "-f", "docker-compose.yml", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("profiles", [[], ["cpu"], ["gpu"]], ids=["base", "cpu", "gpu"])
def test_compose_config_is_valid(compose_dir: Path, profiles: list[str]) -> None:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = _compose(compose_dir, *flags, "config", "-q")
    assert result.returncode == 0, result.stderr


def _filled_in(env_example: str) -> str:
    """``.env.example`` with every secret it leaves empty filled in, as an operator would."""
    lines = env_example.splitlines()
    return "\n".join(f"{line}{'s' * 40}" if line in _SECRETS else line for line in lines) + "\n"


_SECRETS = {
    f"{name}="
    for name in (
        "LORAPLEX_SECRET_KEY",
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
    )
}


def test_the_example_env_has_no_usable_secret_and_compose_refuses_it(tmp_path: Path) -> None:
    """Copied as it is, .env.example does not start: a placeholder secret cannot go live."""
    example = ENV_EXAMPLE.read_text().splitlines()
    assert set(example) >= _SECRETS
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    result = _compose(tmp_path, "config", "-q")
    assert result.returncode != 0
    assert "LORAPLEX_SECRET_KEY" in result.stderr or "PASSWORD" in result.stderr


def test_compose_refuses_to_start_without_required_secrets(tmp_path: Path) -> None:
    folder = tmp_path
    shutil.copy(COMPOSE_FILE, folder / "docker-compose.yml")
    lines = _filled_in(ENV_EXAMPLE.read_text()).splitlines()
    (folder / ".env").write_text(
        "\n".join(line for line in lines if not line.startswith("LORAPLEX_SECRET_KEY=")) + "\n"
    )
    result = _compose(folder, "config", "-q")
    assert result.returncode != 0
    assert "LORAPLEX_SECRET_KEY" in result.stderr


@pytest.fixture(scope="module")
def compose_config(compose_dir: Path) -> dict[str, Any]:
    """The resolved configuration with both profiles on (every service, variables filled)."""
    result = _compose(compose_dir, "--profile", "cpu", "--profile", "gpu", "config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def _services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = config["services"]
    return services


def test_compose_has_every_part(compose_config: dict[str, Any]) -> None:
    expected = {
        "postgres",
        "redis",
        "seaweedfs",
        "api",
        "gateway",
        "worker-cpu",
        "worker-gpu",
        "vllm-gpu",
        "vllm-cpu",
        "ingress",
    } | ONE_SHOT
    assert expected <= set(_services(compose_config))


def test_compose_long_running_services_have_healthchecks(compose_config: dict[str, Any]) -> None:
    for name, service in _services(compose_config).items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", name
            assert "healthcheck" not in service, name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_compose_waits_for_health_and_completion(compose_config: dict[str, Any]) -> None:
    services = _services(compose_config)
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            )
            assert spec == {"condition": expected}, f"{name} -> {dependency}: {spec}"
    for name in ("api", "gateway"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    assert set(services["ingress"]["depends_on"]) == {"api", "gateway"}


def test_compose_profiles(compose_config: dict[str, Any]) -> None:
    services = _services(compose_config)
    for name in ("worker-gpu", "vllm-gpu"):
        assert services[name].get("profiles") == ["gpu"], name
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    for name in ("worker-cpu", "vllm-cpu", "models-init"):
        assert services[name].get("profiles") == ["cpu"], name
    for name in ("postgres", "redis", "seaweedfs", "api", "gateway", "ingress"):
        assert not services[name].get("profiles"), name


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_vllm_runs_with_runtime_lora(compose_config: dict[str, Any]) -> None:
    services = _services(compose_config)
    gateway_env = services["gateway"]["environment"]
    for name in ("vllm-gpu", "vllm-cpu"):
        service = services[name]
        argv = _command(service)
        assert "--enable-lora" in argv, name
        for flag in ("--max-loras", "--max-cpu-loras", "--max-lora-rank"):
            assert int(_flag(argv, flag)) > 0, (name, flag)
        assert str(service["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]) == "True"
        # The gateway keeps at most --max-cpu-loras adapters registered per replica.
        assert int(gateway_env["LORAPLEX_REPLICA_MAX_ADAPTERS"]) <= int(
            _flag(argv, "--max-cpu-loras")
        )
        assert "vllm" in service["networks"]["default"]["aliases"], name
    assert services["vllm-gpu"]["image"].startswith("vllm/vllm-openai:")
    assert services["vllm-cpu"]["build"]["dockerfile"] == "deploy/Dockerfile.vllm-cpu"
    assert gateway_env["LORAPLEX_VLLM_URLS"] == "http://vllm:8000"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume → mount path."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[source] = target
    return mounts


def test_compose_gateway_and_vllm_share_the_adapter_cache(compose_config: dict[str, Any]) -> None:
    services = _services(compose_config)
    cache_dir = services["gateway"]["environment"][ADAPTER_CACHE_ENV]
    assert _mounts(services["gateway"])["adapter-cache"] == cache_dir
    for name in ("vllm-gpu", "vllm-cpu"):
        assert _mounts(services[name])["adapter-cache"] == cache_dir, name
    assert "adapter-cache" in compose_config["volumes"]


def test_compose_builds_exist_and_use_named_volumes(compose_config: dict[str, Any]) -> None:
    named = set(compose_config["volumes"])
    for name, service in _services(compose_config).items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            kind = volume.get("type") if isinstance(volume, dict) else None
            if kind == "bind" or source.startswith(("/", ".")):
                # Only the ingress's configuration is bind-mounted from the repository.
                assert name == "ingress", f"{name}: bind mount {source}"
            else:
                assert source in named, f"{name}: {source}"


def test_compose_variables_are_all_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    example = _env_example_names()
    assert used - example == set(), "add these to .env.example"


def _env_example_names() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            names.add(line.split("=", 1)[0].strip())
    return names


def test_env_example_lists_every_setting() -> None:
    from api.admin.settings import AdminSettings
    from api.settings import APISettings
    from serving.settings import GatewaySettings
    from workers.settings import WorkerSettings

    fields = (
        set(APISettings.model_fields)
        | set(AdminSettings.model_fields)
        | set(GatewaySettings.model_fields)
        | set(WorkerSettings.model_fields)
    )
    settings = {f"LORAPLEX_{name.upper()}" for name in fields}
    missing = settings - WIRED_SETTINGS - _env_example_names()
    assert missing == set(), "add these settings (with a comment) to .env.example"


def test_nginx_routes_inference_to_the_gateway_and_the_rest_to_the_api() -> None:
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    inference = re.search(r"location ~ \^/v1/\(chat/\)\?completions\$ \{(.*?)\}", conf, re.S)
    assert inference and "proxy_pass http://gateway;" in inference.group(1)
    assert "proxy_buffering off;" in inference.group(1)
    rest = re.search(r"location / \{(.*?)\}", conf, re.S)
    assert rest and "proxy_pass http://api;" in rest.group(1)


def test_the_api_believes_the_client_address_only_from_its_proxy(
    compose_config: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    """The login throttle keys on the client's address. nginx, the edge, must replace a
    client's X-Forwarded-For (appended to, a forged one would give each guess a new address),
    and the API must believe nginx (or every visitor shares nginx's address, and five wrong
    passwords lock an admin out for everyone)."""
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf
    assert "$proxy_add_x_forwarded_for" not in conf
    api = compose_config["services"]["api"]
    assert api["environment"]["LORAPLEX_FORWARDED_ALLOW_IPS"] == "*"
    assert "ports" not in api  # reachable through nginx only
    config = _find(manifests, "ConfigMap", "loraplex-config")["data"]
    assert config["LORAPLEX_FORWARDED_ALLOW_IPS"] == "*"


DOCKERFILES = sorted(
    p for p in (ROOT / "deploy").glob("Dockerfile.*") if p.suffix != ".dockerignore"
)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists(dockerfile: Path) -> None:
    """Every COPY source from the build context (the repository root) exists, and the
    BuildKit ignore file beside it does not exclude it."""
    ignored = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    ignored_tops = {line for line in ignored if line and not line.startswith(("#", "*"))}
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M)
    for sources in copies:
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"
            assert source.split("/")[0] not in ignored_tops, f"{dockerfile.name}: {source}"
    assert "USER " in dockerfile.read_text(), f"{dockerfile.name} runs as root"


# ------------------------------------------------------------------------ kubernetes ----


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _documents(path)]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_k8s_manifest_validates_against_the_schema(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path.name} is empty"
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_kustomization_lists_every_manifest_but_the_example_secret_and_the_job() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    expected = {p.name for p in _manifest_files()} - {"secret.example.yaml", "migrate-job.yaml"}
    assert listed == expected


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in manifests:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def _workloads(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in manifests if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _env(container: dict[str, Any], name: str) -> str:
    for item in container.get("env", []):
        if item["name"] == name:
            value: str = item["value"]
            return value
    raise AssertionError(f"{container['name']} sets no {name}")


def test_k8s_has_every_part(manifests: list[dict[str, Any]]) -> None:
    for kind, name in [
        ("Namespace", "loraplex"),
        ("ConfigMap", "loraplex-config"),
        ("Secret", "loraplex-secrets"),
        ("Deployment", "api"),
        ("StatefulSet", "gateway"),
        ("StatefulSet", "vllm"),
        ("Deployment", "worker-gpu"),
        ("Deployment", "worker-cpu"),
        ("Service", "api"),
        ("Service", "gateway"),
        ("Service", "vllm"),
        ("Ingress", "loraplex-inference"),
        ("Ingress", "loraplex-api"),
        ("NetworkPolicy", "vllm-only-from-gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("Job", "migrate"),
        ("PersistentVolumeClaim", "adapter-cache"),
    ]:
        _find(manifests, kind, name)


def test_k8s_every_container_has_requests_limits_and_probes(
    manifests: list[dict[str, Any]],
) -> None:
    for workload in _workloads(manifests):
        for container in _containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            if workload["kind"] == "Job":
                continue
            assert "readinessProbe" in container, f"{where}: no readiness probe"
            if container.get("ports"):
                assert "livenessProbe" in container, f"{where}: no liveness probe"


def test_k8s_gpu_workloads_request_a_gpu(manifests: list[dict[str, Any]]) -> None:
    for kind, name in [("StatefulSet", "vllm"), ("Deployment", "worker-gpu")]:
        (container,) = _find(manifests, kind, name)["spec"]["template"]["spec"]["containers"]
        for bound in ("requests", "limits"):
            assert int(container["resources"][bound]["nvidia.com/gpu"]) >= 1, (name, bound)
    for kind, name in [
        ("Deployment", "api"),
        ("StatefulSet", "gateway"),
        ("Deployment", "worker-cpu"),
    ]:
        for container in _containers(_find(manifests, kind, name)):
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), name


def test_k8s_vllm_serves_runtime_lora_and_is_ready_on_health(
    manifests: list[dict[str, Any]],
) -> None:
    (container,) = _find(manifests, "StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    for flag in ("--enable-lora", "--max-loras", "--max-cpu-loras", "--max-lora-rank"):
        assert flag in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert _env(container, "VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"
    config = _find(manifests, "ConfigMap", "loraplex-config")["data"]
    vllm_config = _find(manifests, "ConfigMap", "vllm-config")["data"]
    assert int(config["LORAPLEX_REPLICA_MAX_ADAPTERS"]) <= int(vllm_config["VLLM_MAX_CPU_LORAS"])


def test_k8s_gateway_lists_one_url_per_vllm_pod(manifests: list[dict[str, Any]]) -> None:
    statefulset = _find(manifests, "StatefulSet", "vllm")
    service = statefulset["spec"]["serviceName"]
    assert _find(manifests, "Service", service)["spec"]["clusterIP"] == "None"
    namespace = statefulset["metadata"]["namespace"]
    urls = _find(manifests, "ConfigMap", "loraplex-config")["data"]["LORAPLEX_VLLM_URLS"]
    expected = [
        f"http://vllm-{i}.{service}.{namespace}.svc.cluster.local:8000"
        for i in range(statefulset["spec"]["replicas"])
    ]
    assert [u.strip() for u in urls.split(",")] == expected


def test_k8s_gateway_and_vllm_share_the_adapter_cache(manifests: list[dict[str, Any]]) -> None:
    claim = _find(manifests, "PersistentVolumeClaim", "adapter-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    paths = {}
    for kind, name in [("StatefulSet", "gateway"), ("StatefulSet", "vllm")]:
        workload = _find(manifests, kind, name)
        pod = workload["spec"]["template"]["spec"]
        volume = next(v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
        paths[name] = mount["mountPath"]
        claim_names = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claim_names == ["adapter-cache"], name
    assert paths["gateway"] == paths["vllm"]
    (gateway,) = _find(manifests, "StatefulSet", "gateway")["spec"]["template"]["spec"][
        "containers"
    ]
    assert _env(gateway, ADAPTER_CACHE_ENV).startswith(paths["gateway"] + "/")


def test_k8s_network_policy_lets_only_the_gateway_reach_vllm(
    manifests: list[dict[str, Any]],
) -> None:
    policy = _find(manifests, "NetworkPolicy", "vllm-only-from-gateway")["spec"]
    vllm = _find(manifests, "StatefulSet", "vllm")
    gateway = _find(manifests, "StatefulSet", "gateway")
    selector = policy["podSelector"]["matchLabels"]
    assert _matches(selector, _pod_labels(vllm))
    assert "Ingress" in policy["policyTypes"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespace or IP block may reach vLLM"
    allowed = peer["podSelector"]["matchLabels"]
    assert allowed, "an empty selector would allow every pod"
    for workload in _workloads(manifests):
        is_gateway = workload is gateway
        assert _matches(allowed, _pod_labels(workload)) == is_gateway, workload["metadata"]
        if workload is not vllm:
            assert not _matches(selector, _pod_labels(workload)), workload["metadata"]
    assert [p["port"] for p in rule["ports"]] == [8000]


def test_k8s_services_select_workloads(manifests: list[dict[str, Any]]) -> None:
    workloads = _workloads(manifests)
    for service in (d for d in manifests if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(_matches(selector, _pod_labels(w)) for w in workloads), service["metadata"]


def test_k8s_ingress_is_one_base_url(manifests: list[dict[str, Any]]) -> None:
    routes: dict[str, tuple[str, str]] = {}
    hosts = set()
    for ingress in (d for d in manifests if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            hosts.add(rule["host"])
            for path in rule["http"]["paths"]:
                routes[path["path"]] = (path["pathType"], path["backend"]["service"]["name"])
    assert len(hosts) == 1
    assert routes == {
        "/v1/chat/completions": ("Exact", "gateway"),
        "/v1/completions": ("Exact", "gateway"),
        "/": ("Prefix", "api"),
    }


def test_k8s_hpa_scales_the_gateway(manifests: list[dict[str, Any]]) -> None:
    hpa = _find(manifests, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "gateway",
    }
    assert hpa["minReplicas"] >= 2


def test_k8s_migrations_run_as_a_job_with_the_api_image(manifests: list[dict[str, Any]]) -> None:
    job = _find(manifests, "Job", "migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["loraplex", "migrate"]
    (api,) = _find(manifests, "Deployment", "api")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == api["image"]


def test_k8s_gateway_pods_keep_their_adapter_cache_folder(manifests: list[dict[str, Any]]) -> None:
    """Each gateway pod caches adapters in a folder named after itself: the names must be stable
    (a StatefulSet), or every rollout leaves folders that fill the shared volume."""
    gateway = _find(manifests, "StatefulSet", "gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert _env(container, ADAPTER_CACHE_ENV).endswith("/$(POD_NAME)")
    (pod_name,) = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert [
        d for d in manifests if d.get("kind") == "Deployment" and d["metadata"]["name"] == "gateway"
    ] == []
