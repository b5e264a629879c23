from __future__ import annotations

import base64
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the schemas kubernetes-validate checks against
FLAVOURS = {"base": "base", "gpu": "overlays/gpu"}
TOKEN = "test-token-4b1d"  # what admin.env holds in the copy the tests render

Object = dict[str, Any]

spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
render_module = importlib.util.module_from_spec(spec)
sys.modules["k8s_render"] = render_module
spec.loader.exec_module(render_module)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s copied, with the admin.env an operator would write (git ignores it)."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("admin.env", "__pycache__"))
    (root / "base" / "admin.env").write_text(f"token={TOKEN}\n")
    return root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Object]]:
    return {flavour: render_module.render(tree / path) for flavour, path in FLAVOURS.items()}


@pytest.fixture(params=list(FLAVOURS))
def objects(rendered: dict[str, list[Object]], request: pytest.FixtureRequest) -> list[Object]:
    """The objects of each flavour in turn."""
    return rendered[request.param]


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} objects"
    return matches[0]


def pod_specs(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def container(objects: list[Object], kind: str, name: str) -> Object:
    (only,) = find(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def env_vars(c: Object) -> dict[str, Object]:
    return {var["name"]: var for var in c.get("env", [])}


def test_every_object_is_valid_for_the_pinned_kubernetes(objects: list[Object]) -> None:
    errors = []  # the schema's own message is pages long: keep the gist
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            errors.append(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {where}")
    assert not errors


def test_the_teacher_is_ready_on_readyz_and_alive_on_healthz(objects: list[Object]) -> None:
    teacher = container(objects, "Deployment", "teacher")
    assert teacher["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert teacher["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert teacher["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = container(objects, "Deployment", "env")
    assert env["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_a_disruption_budget_keeps_one_of_several_teachers(
    rendered: dict[str, list[Object]],
) -> None:
    teacher = find(rendered["base"], "Deployment", "teacher")
    budget = find(rendered["base"], "PodDisruptionBudget", "teacher")
    assert teacher["spec"]["replicas"] >= 2
    assert budget["spec"]["minAvailable"] == 1
    pod_labels = teacher["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_each_service_and_deployment_selects_its_own_pods(objects: list[Object]) -> None:
    for name in ("teacher", "env"):
        deployment = find(objects, "Deployment", name)
        service = find(objects, "Service", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        container_ports = {
            p["name"]: p["containerPort"] for p in container(objects, "Deployment", name)["ports"]
        }
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"]


def test_every_object_is_labelled_part_of_sage_opd_with_its_own_name(objects: list[Object]) -> None:
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "sage-opd"
        assert labels["app.kubernetes.io/name"]


def test_the_admin_token_comes_from_the_secret_alone(objects: list[Object]) -> None:
    secret = find(objects, "Secret", "sage-opd-admin")
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    token = env_vars(container(objects, "Deployment", "teacher"))["SAGE_TEACHER_ADMIN_TOKEN"]
    assert token == {
        "name": "SAGE_TEACHER_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "sage-opd-admin", "key": "token"}},
    }
    others = [o for o in objects if o is not secret]
    assert TOKEN not in yaml.safe_dump_all(others)
    for path in K8S.rglob("*"):
        if path.is_file() and path.name != "admin.env":
            assert TOKEN not in path.read_text(errors="replace")


def test_every_container_runs_as_non_root_and_cannot_escalate(objects: list[Object]) -> None:
    specs = dict(pod_specs(objects))
    assert set(specs) == {"teacher", "env", "trainer"}
    for name, pod in specs.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"].get("runAsUser", 10001) != 0, name


def test_the_models_are_mounted_read_only(rendered: dict[str, list[Object]]) -> None:
    for name, pod in pod_specs(rendered["base"]):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        for mount in pod["containers"][0]["volumeMounts"]:
            if claims.get(mount["name"]) == "sage-opd-models":
                assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}, name


def test_the_gpu_overlay_gives_the_teacher_a_gpu_and_vllm_and_the_base_does_not(
    rendered: dict[str, list[Object]],
) -> None:
    gpu = container(rendered["gpu"], "Deployment", "teacher")
    assert gpu["image"] == "sage-opd-teacher-vllm:latest"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_vars(gpu)["SAGE_TEACHER_BACKEND"]["value"] == "vllm"
    assert env_vars(gpu)["SAGE_TEACHER_DTYPE"]["value"] == "bfloat16"
    assert container(rendered["gpu"], "Job", "trainer")["resources"]["limits"]["nvidia.com/gpu"]
    for name, pod in pod_specs(rendered["gpu"]):
        if name != "env":
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ], name

    cpu = container(rendered["base"], "Deployment", "teacher")
    assert cpu["image"] == "sage-opd-teacher-cpu:latest"
    assert "SAGE_TEACHER_BACKEND" not in env_vars(cpu)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered["base"])


def test_the_trainer_reaches_the_services_by_their_names_and_ports(objects: list[Object]) -> None:
    job = find(objects, "Job", "trainer")
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    command = container(objects, "Job", "trainer")["command"]
    assert command[:3] == ["sage-opd", "train", "--config"]
    settings = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--set")
    urls = [*yaml.safe_load(settings["teacher_urls"]), settings["env_url"]]
    assert len(urls) == 2
    for url in urls:
        parts = urlsplit(url)
        service = find(objects, "Service", parts.hostname)
        assert parts.port in [p["port"] for p in service["spec"]["ports"]], url
    assert settings["out_dir"].startswith("/runs/")


@pytest.mark.parametrize(
    "kustomization",
    [
        {"resources": [], "namespace": "sage"},
        {"resources": [], "commonLabels": {"a": "b"}},
        {"resources": [], "images": [{"name": "x", "newTag": "1"}]},
        {"secretGenerator": [{"name": "s", "literals": ["a=b"]}]},  # a hashed name
        {"patches": [{"target": {"kind": "Job", "name": "j"}, "patch": "spec: {}"}]},
        {"labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]},
    ],
)
def test_the_renderer_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: dict[str, Any]
) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with pytest.raises(render_module.KustomizeError):
        render_module.render(tmp_path)


def test_a_missing_admin_env_is_an_error_unless_the_example_may_stand_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("admin.env"))
    with pytest.raises(render_module.KustomizeError, match="admin.env"):
        render_module.render(tmp_path / "k8s" / "base")
    objects = render_module.render(tmp_path / "k8s" / "base", example_env=True)
    secret = find(objects, "Secret", "sage-opd-admin")
    assert base64.b64decode(secret["data"]["token"]) == b"change-me"
    assert "admin.env.example" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kubectl_kustomize_renders_the_same_objects(
    tree: Path, rendered: dict[str, list[Object]], flavour: str
) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(tree / FLAVOURS[flavour])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    def key(obj: Object) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    theirs = sorted((o for o in yaml.safe_load_all(output) if o), key=key)
    assert sorted(rendered[flavour], key=key) == theirs
