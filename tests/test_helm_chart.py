"""The Helm chart (deploy/helm/specdec): it lints, renders, validates strictly against the Kubernetes 1.30 schemas,
scans clean with checkov, and the rendered objects say what a cluster operator relies on: three tiers, each GPU
tier scaled on its own metric, PDBs, native gRPC probes, NetworkPolicies, hardened containers, discovery RBAC for
the router, and a `helm test` hook that calls Generate.

The tools come from `make tools` (.tools/bin). Outside CI a missing tool skips its tests with the reason; in CI
(CI=true) a missing tool fails them, so a broken install cannot pass as green.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "specdec"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DOCKERFILES = ROOT / "deploy" / "docker"
NAMESPACE = "specdec"
RELEASE = "t"
FULLNAME = f"{RELEASE}-specdec"
KUBERNETES_VERSION = "1.30.0"

# Values cases: the defaults, every example file, and the KEDA / observability switches.
CASES = {
    "default": [],
    **{path.stem: ["-f", str(path)] for path in EXAMPLES},
    "keda-observability": ["--set", "keda.enabled=true", "--set", "router.autoscaling.enabled=true",
                           "--set", "metrics.podMonitor.enabled=true", "--set", "grafanaDashboard.enabled=true"],
}
TIERS = ("router", "drafter", "verifier")
GRPC_PORTS = {"router": 50051, "drafter": 50052, "verifier": 50053}


def tool(name: str) -> str:
    found = ROOT / ".tools" / "bin" / name
    path = str(found) if found.exists() else shutil.which(name)
    if path:
        return path
    reason = f"{name} not found in .tools/bin or PATH: run `make tools`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: chart tests must run in CI)")
    pytest.skip(reason)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def helm_template(*values: str) -> str:
    done = run(tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each case rendered once into a file of its own."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for case, values in CASES.items():
        files[case] = out / f"{case}.yaml"
        files[case].write_text(helm_template(*values))
    return files


def objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod template (Deployments) and bare pod (the test hook), by object name."""
    specs = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in find(docs, "Deployment")}
    specs.update({d["metadata"]["name"]: d["spec"] for d in find(docs, "Pod")})
    return specs


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def tier_pod_labels(docs: list[dict], tier: str) -> dict:
    return one(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["metadata"]["labels"]


# -- the tools' verdicts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_chart_lints_strict(case):
    done = run(tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *CASES[case])
    assert done.returncode == 0, done.stdout + done.stderr


def test_rendered_manifests_validate_strictly_against_kubernetes_1_30(rendered):
    done = run(tool("kubernetes-validate"), "--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet",
               *map(str, rendered.values()))
    assert done.returncode == 0, done.stdout + done.stderr
    # Only the optional CRDs (KEDA, prometheus-operator) lack a schema; every core object was checked.
    unchecked = [line for line in done.stdout.splitlines() if "Couldn't find schema" in line]
    assert all("ScaledObject" in line or "PodMonitor" in line for line in unchecked), unchecked


def test_kubernetes_validate_rejects_an_invalid_field():
    """The validation above is strict: a misspelt field in extraEnv is an error, not a warning."""
    bad = helm_template("--set", "router.extraEnv[0].name=X", "--set", "router.extraEnv[0].valu=1")
    done = subprocess.run([tool("kubernetes-validate"), "--kubernetes-version", KUBERNETES_VERSION, "--strict",
                           "--quiet", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "valu" in done.stdout + done.stderr


def test_checkov_finds_no_failed_check_and_every_skip_says_why(rendered, tmp_path):
    report = tmp_path / "checkov"
    done = run(tool("checkov"), "--directory", str(rendered["default"].parent), "--directory", str(DOCKERFILES),
               "--framework", "kubernetes", "dockerfile", "--skip-download", "--compact",
               "--output", "json", "--output-file-path", str(report))
    results = json.loads((report / "results_json.json").read_text())
    results = results if isinstance(results, list) else [results]
    scanned = {r["check_type"]: r["summary"] for r in results}
    assert {"kubernetes", "dockerfile"} <= scanned.keys(), done.stdout + done.stderr
    assert all(s["passed"] > 100 for s in scanned.values()), scanned  # the scan did look at the objects
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in results for c in r["results"]["failed_checks"]]
    assert not failed, failed
    skipped = [c for r in results for c in r["results"]["skipped_checks"]]
    reasons = {(c["check_id"], c["resource"]): c["check_result"].get("suppress_comment") or "" for c in skipped}
    assert skipped and all(len(reason) > 20 for reason in reasons.values()), reasons
    # Skips are the chart's few documented ones (_helpers.tpl, specdec.checkovSkips), not a blanket.
    assert {check for check, _ in reasons} <= {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_38", "CKV_K8S_8", "CKV_K8S_9"}
    assert {resource for check, resource in reasons if check == "CKV_K8S_38"} == {
        f"Deployment.{NAMESPACE}.{FULLNAME}-router"}
    assert {resource for check, resource in reasons if check in ("CKV_K8S_8", "CKV_K8S_9")} == {
        f"Pod.{NAMESPACE}.{FULLNAME}-test-generate"}


def test_schema_rejects_unknown_and_misspelt_values():
    done = run(tool("helm"), "template", RELEASE, str(CHART), "--set", "verifier.replica=3")
    assert done.returncode != 0 and "replica" in done.stderr
    done = run(tool("helm"), "template", RELEASE, str(CHART), "--set", "verifier.autoscaling.metric=gpuUtil")
    assert done.returncode != 0 and "queueDepth" in done.stderr


# -- what the rendered objects promise --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_three_tiers_with_contract_ports_and_services(rendered, case):
    docs = objects(rendered[case])
    for tier in TIERS:
        deployment = one(docs, "Deployment", f"{FULLNAME}-{tier}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][:2] == ["serve", tier]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": GRPC_PORTS[tier], "metrics": 9464}
        service = one(docs, "Service", f"{FULLNAME}-{tier}")
        assert labels_match({"matchLabels": service["spec"]["selector"]}, tier_pod_labels(docs, tier))
        if tier != "router":  # the router addresses each drafter and verifier pod: headless, grpc + metrics
            assert service["spec"]["clusterIP"] == "None"
            assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}


def test_gpu_tiers_request_gpus_and_autoscale_on_their_own_metric(rendered):
    docs = objects(rendered["default"])
    metrics = {}
    for tier in ("drafter", "verifier"):
        pod = one(docs, "Deployment", f"{FULLNAME}-{tier}")
        assert "replicas" not in pod["spec"], "the HPA owns the replica count"
        (container,) = pod["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-{tier}")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": f"{FULLNAME}-{tier}"}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        metrics[tier] = metric["pods"]["metric"]["name"]
    assert metrics == {"drafter": "specdec_drafter_pending_work", "verifier": "specdec_verifier_queue_depth"}
    assert not find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-router")  # off by default

    occupancy = yaml.safe_load_all(helm_template("--set", "verifier.autoscaling.metric=batchOccupancy"))
    hpa = next(d for d in occupancy if d and d["kind"] == "HorizontalPodAutoscaler" and "verifier" in d["metadata"]["name"])
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "specdec_verifier_batch_occupancy_ratio"


def test_router_scales_on_cpu_in_the_cloud_example(rendered):
    docs = objects(rendered["cloud-two-pools"])
    (metric,) = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-router")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"


def test_keda_scaled_objects_replace_the_hpas(rendered):
    docs = objects(rendered["keda-observability"])
    assert not find(docs, "HorizontalPodAutoscaler")
    queries = {}
    for tier in TIERS:
        scaled = one(docs, "ScaledObject", f"{FULLNAME}-{tier}")
        assert scaled["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-{tier}"
        (trigger,) = scaled["spec"]["triggers"]
        queries[tier] = trigger["metadata"].get("query", trigger["type"])
    assert queries["router"] == "cpu"
    assert queries["drafter"].startswith("sum(specdec_drafter_pending_work{")
    assert queries["verifier"].startswith("sum(specdec_verifier_queue_depth{")
    assert f'pod=~"{FULLNAME}-verifier-.*"' in queries["verifier"]


def test_prometheus_adapter_rules_serve_every_hpa_metric(rendered):
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    wanted = {"specdec_verifier_batch_occupancy_ratio"}
    for case in rendered:
        for hpa in find(objects(rendered[case]), "HorizontalPodAutoscaler"):
            wanted |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted <= served, wanted - served


@pytest.mark.parametrize("case", list(CASES))
def test_a_pdb_per_tier_selects_that_tier(rendered, case):
    docs = objects(rendered[case])
    for tier in TIERS:
        pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-{tier}")
        assert labels_match(pdb["spec"]["selector"], tier_pod_labels(docs, tier))
        others = [t for t in TIERS if t != tier]
        assert not any(labels_match(pdb["spec"]["selector"], tier_pod_labels(docs, t)) for t in others)


@pytest.mark.parametrize("case", list(CASES))
def test_every_tier_probes_grpc_health_on_its_grpc_port(rendered, case):
    docs = objects(rendered[case])
    for tier in TIERS:
        (container,) = one(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": GRPC_PORTS[tier]}, (tier, probe)


@pytest.mark.parametrize("case", list(CASES))
def test_every_container_is_hardened_with_writable_volumes_only_where_needed(rendered, case):
    docs = objects(rendered[case])
    specs = pod_specs(docs)
    assert {f"{FULLNAME}-{t}" for t in (*TIERS, "redis")} | {f"{FULLNAME}-test-generate"} <= specs.keys()
    for name, spec in specs.items():
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] >= 10000, name
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert context.get("privileged") in (None, False), where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            cache = env_of(container).get("SPECDEC_CACHE_DIR")
            if cache:  # model conversions land on a writable volume, never the image
                mount = mounts[cache["value"]]
                assert not mount.get("readOnly") and mount["name"] in volumes, where
            assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"], where


@pytest.mark.parametrize("case", list(CASES))
def test_network_policies_admit_only_the_tiers_that_call_each_other(rendered, case):
    docs = objects(rendered[case])

    def grpc_sources(tier: str) -> set[str]:
        policy = one(docs, "NetworkPolicy", f"{FULLNAME}-{tier}")
        assert labels_match(policy["spec"]["podSelector"], tier_pod_labels(docs, tier))
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        sources = set()
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if "metrics" in ports:  # scraping reaches the metrics port only
                assert ports == {"metrics"}
                continue
            assert ports == {"grpc"}
            if "from" not in rule:
                sources.add("anyone")
            for peer in rule.get("from", []):
                assert "namespaceSelector" not in peer or tier == "router", "tiers talk within the release"
                component = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                sources.add(component or "clients")
        return sources

    assert grpc_sources("verifier") == {"drafter", "router"}
    assert grpc_sources("drafter") == {"router"}
    assert grpc_sources("router") in ({"anyone"}, {"clients", "test"})
    redis = one(docs, "NetworkPolicy", f"{FULLNAME}-redis")
    (rule,) = redis["spec"]["ingress"]
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]} == {
        "router", "verifier"}


def test_metrics_scraping_is_limited_to_the_configured_prometheus(rendered):
    docs = objects(rendered["default"])
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-verifier")
    (metrics_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "metrics", "protocol": "TCP"}]]
    (peer,) = metrics_rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_router_discovers_tiers_through_endpointslices_with_least_privilege(rendered):
    docs = objects(rendered["default"])
    router = one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]
    args = router["containers"][0]["args"]
    assert {"--discovery=kubernetes", f"--drafter-service={FULLNAME}-drafter",
            f"--verifier-service={FULLNAME}-verifier", f"--kube-namespace={NAMESPACE}"} <= set(args)
    assert f"--redis-url=redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0" in args
    role = one(docs, "Role", f"{FULLNAME}-router-discovery")
    slices = [r for r in role["rules"] if r["apiGroups"] == ["discovery.k8s.io"]]
    assert slices and {"list", "watch"} <= set(slices[0]["verbs"]) and slices[0]["resources"] == ["endpointslices"]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} and "*" not in r["resources"] for r in role["rules"])
    binding = one(docs, "RoleBinding", f"{FULLNAME}-router-discovery")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": router["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    # Only the router holds an API token.
    for name, spec in pod_specs(docs).items():
        if name != f"{FULLNAME}-router":
            assert spec["automountServiceAccountToken"] is False, name
            assert spec["serviceAccountName"] != router["serviceAccountName"], name


def test_verifiers_advertise_their_pod_ip_and_grpc_port(rendered):
    docs = objects(rendered["default"])
    (container,) = one(docs, "Deployment", f"{FULLNAME}-verifier")["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["SPECDEC_ADVERTISE"]["value"] == "$(POD_IP):50053"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("SPECDEC_ADVERTISE"), "$(POD_IP) expands only if defined earlier"


@pytest.mark.parametrize("case", list(CASES))
def test_termination_grace_outlasts_the_drain(rendered, case):
    docs = objects(rendered[case])
    for tier in TIERS:
        spec = one(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]
        drain = float(env_of(spec["containers"][0])["SPECDEC_GRACE"]["value"])
        assert spec["terminationGracePeriodSeconds"] > drain, tier


def test_helm_test_hook_calls_generate_on_the_router_service(rendered):
    docs = objects(rendered["default"])
    pod = one(docs, "Pod", f"{FULLNAME}-test-generate")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    script, address, *_ = container["args"]
    assert container["command"] == ["python", "-c"] and "from specdec import Client" in script
    assert "client.generate(" in script and "sys.exit(" in script
    router_port = one(docs, "Service", f"{FULLNAME}-router")["spec"]["ports"][0]["port"]
    assert address == f"{FULLNAME}-router.{NAMESPACE}.svc:{router_port}"
    assert labels_match(one(docs, "NetworkPolicy", f"{FULLNAME}-test")["spec"]["podSelector"], pod["metadata"]["labels"])


def test_the_test_pod_may_call_a_router_with_restricted_clients(rendered):
    docs = objects(rendered["cloud-two-pools"])
    pod_labels = one(docs, "Pod", f"{FULLNAME}-test-generate")["metadata"]["labels"]
    (grpc_rule,) = [r for r in one(docs, "NetworkPolicy", f"{FULLNAME}-router")["spec"]["ingress"]
                    if r["ports"][0]["port"] == "grpc"]
    assert any("podSelector" in p and labels_match(p["podSelector"], pod_labels) for p in grpc_rule["from"])


def test_redis_is_bundled_or_external():
    docs = [d for d in yaml.safe_load_all(helm_template("--namespace", NAMESPACE)) if d]
    assert find(docs, "Deployment", f"{FULLNAME}-redis") and find(docs, "Service", f"{FULLNAME}-redis")
    redis = one(docs, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][:2] == ["--save", ""] and "--appendonly" in redis["args"], "no persistence"

    url = "redis://cache.example.svc:6379/2"
    docs = [d for d in yaml.safe_load_all(helm_template("--set", "redis.enabled=false",
                                                        "--set", f"redis.external.url={url}")) if d]
    assert not find(docs, "Deployment", f"{FULLNAME}-redis") and not find(docs, "NetworkPolicy", f"{FULLNAME}-redis")
    for tier in ("router", "verifier"):
        args = one(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--redis-url={url}" in args


def test_cpu_dev_example_asks_for_no_gpu_and_cloud_example_splits_the_pools(rendered):
    cpu = objects(rendered["cpu-dev"])
    assert "nvidia.com/gpu" not in rendered["cpu-dev"].read_text()
    for tier in ("drafter", "verifier"):
        (container,) = one(cpu, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]["containers"]
        assert "--device=cpu" in container["args"]
    assert not find(cpu, "HorizontalPodAutoscaler")

    cloud = objects(rendered["cloud-two-pools"])
    products = {}
    for tier in ("drafter", "verifier"):
        spec = one(cloud, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]
        products[tier] = spec["nodeSelector"]["nvidia.com/gpu.product"]
        assert any(t.get("value") == f"{tier}s" for t in spec["tolerations"])
        for constraint in spec["topologySpreadConstraints"]:  # filled in by the chart: spread this tier's pods
            assert labels_match(constraint["labelSelector"], spec_labels := tier_pod_labels(cloud, tier)), spec_labels
    assert products == {"drafter": "NVIDIA-L4", "verifier": "NVIDIA-H200"}


def test_models_mount_read_only_and_the_cache_is_writable(rendered):
    docs = objects(rendered["cloud-two-pools"])
    spec = one(docs, "Deployment", f"{FULLNAME}-verifier")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "specdec-models", "readOnly": True}
    (container,) = spec["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and mounts["models"]["mountPath"] == "/models"
    assert "--model=/models/Llama-3.1-8B-Instruct" in container["args"]
    # The default install converts the shipped target once per pod, before the server starts.
    default = one(objects(rendered["default"]), "Deployment", f"{FULLNAME}-verifier")["spec"]["template"]["spec"]
    (init,) = default["initContainers"]
    assert init["args"] == ["prepare-models", "--model", "smollm2-135m-instruct"]


CONTRACT_SERIES = (
    "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_server_request_duration_seconds", "specdec_router_routing_mode", "specdec_router_cached_prefix_blocks_total",
    "specdec_router_sessions_in_flight", "specdec_verifier_queue_depth", "specdec_verifier_batch_occupancy_ratio",
    "specdec_verifier_batch_size", "specdec_speculation_drafts_total", "specdec_speculation_draft_tokens_total",
    "specdec_speculation_accepted_tokens_total", "specdec_speculation_accepted_by_position_total",
    "specdec_speculation_drafted_by_position_total",
    "specdec_drafter_pending_work", "specdec_drafter_sessions",
)


def test_grafana_dashboard_plots_every_contract_series_and_ships_as_a_labelled_configmap(rendered):
    docs = objects(rendered["keda-observability"])
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["specdec.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    missing = [series for series in CONTRACT_SERIES if series not in exprs]
    assert not missing, missing
    pods = one(docs, "Deployment", f"{FULLNAME}-drafter")["spec"]["template"]["metadata"]["annotations"]
    assert pods["prometheus.io/scrape"] == "true" and pods["prometheus.io/port"] == "9464"
    monitor = one(docs, "PodMonitor", FULLNAME)
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_verifiers_capture_the_shipped_drafters_layers_at_start_up_only_when_it_drafts(rendered):
    """graphWarmupFeatureLayers=auto: the default install's verifiers warm the fused drafter's hidden-state graphs;
    an install with another drafter (an 8B target, whose layers differ) gets none, and an explicit list wins."""
    def verifier_args(docs):
        return one(docs, "Deployment", f"{FULLNAME}-verifier")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--graph-warmup-feature-layers=2,15,29" in verifier_args(objects(rendered["default"]))
    assert not any(a.startswith("--graph-warmup-feature-layers") for a in verifier_args(
        objects(rendered["cloud-two-pools"])))
    explicit = [doc for doc in yaml.safe_load_all(helm_template(
        "--set", "verifier.graphWarmupFeatureLayers=3\\,20\\,31")) if doc]
    assert "--graph-warmup-feature-layers=3,20,31" in verifier_args(explicit)


def test_model_dtype_reaches_every_engine_and_a_wrong_one_is_refused(rendered):
    """model.dtype is the drafters' and verifiers' --dtype (auto by default; float32 for token-exact greedy output on
    a GPU); the router runs no engine. A format the engines lack fails the install, not a pod."""
    def args(docs, tier):
        return one(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]["template"]["spec"]["containers"][0]["args"]

    default = objects(rendered["default"])
    assert "--dtype=auto" in args(default, "drafter") and "--dtype=auto" in args(default, "verifier")
    assert not any(a.startswith("--dtype") for a in args(default, "router"))
    exact = [doc for doc in yaml.safe_load_all(helm_template("--set", "model.dtype=float32")) if doc]
    assert "--dtype=float32" in args(exact, "drafter") and "--dtype=float32" in args(exact, "verifier")
    refused = run(tool("helm"), "template", RELEASE, str(CHART), "--set", "model.dtype=fp8")
    assert refused.returncode != 0 and "dtype" in refused.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_the_chart_command_lines_are_ones_specdec_accepts(rendered, case):
    """Every container's args parse with the real CLI, so a renamed flag breaks this test, not a rollout."""
    from specdec.cli import build_parser

    parser = build_parser()
    for name, spec in pod_specs(objects(rendered[case])).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            if container["name"] in ("redis", "generate"):
                continue
            args = parser.parse_args(container["args"])
            assert args.func.__name__ in ("cmd_serve_router", "cmd_serve_drafter", "cmd_serve_verifier",
                                          "cmd_prepare"), name
            if args.func.__name__ == "cmd_serve_router":
                assert args.discovery == "kubernetes" and args.drafter_service == f"{FULLNAME}-drafter"
