"""The container image and Kubernetes manifests (Dockerfile, deploy/kubernetes/).

No container engine or cluster here: every manifest is validated against Kubernetes' own
schemas (kubernetes-validate, offline), the properties sharing depends on are asserted, and the
image's entrypoint, command and health check run as the image would run them, on this machine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loracache.shared.ipc_compat import check_importer
from tests.support import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
EXAMPLES = KUBERNETES / "examples"
DOCKERFILE = REPO / "Dockerfile"
K8S_VERSION = "1.30"  # the oldest release the manifests are written for
GROUP = 10001  # the image's loracache group: the socket is 0660 in it
PING = ["loracache", "ping", "--socket", "/run/loracache/daemon.sock"]


def manifests() -> dict[str, dict[str, Any]]:
    """Each resource of the two kustomizations (the daemon's, the example's), by kind/name."""
    found = {}
    for directory in (KUBERNETES, EXAMPLES):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for name in kustomization["resources"]:
            for document in yaml.safe_load_all((directory / name).read_text()):
                found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def config(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(resources["ConfigMap/loracache-config"]["data"]["config.toml"])


def pod(resources: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return resources[key]["spec"]["template"]["spec"]


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def host_paths(spec: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}


# ------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("directory", [KUBERNETES, EXAMPLES], ids=["daemon", "examples"])
def test_every_file_of_a_directory_is_in_its_kustomization(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "loracache"


def test_the_namespace_allows_what_sharing_needs_and_the_priority_class():
    resources = manifests()
    labels = resources["Namespace/loracache"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    quota = resources["ResourceQuota/loracache-node-critical"]["spec"]["scopeSelector"]
    (expression,) = quota["matchExpressions"]
    spec = pod(resources, "DaemonSet/loracache")
    assert expression["scopeName"] == "PriorityClass"
    assert spec["priorityClassName"] in expression["values"]


def test_the_daemons_memory_stays_under_its_limit():
    """Host copies live in /dev/shm, which counts against the pod's memory: the host tier
    (the only CPU memory the GPU-only daemon fills) and headroom fit the limit."""
    resources = manifests()
    settings = config(resources)
    assert settings["devices"] == ["cuda"]
    (daemon,) = pod(resources, "DaemonSet/loracache")["containers"]
    limit = daemon["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and settings["host_max_bytes"].endswith("GiB")
    assert int(settings["host_max_bytes"][:-3]) + 8 <= int(limit[:-2])


@pytest.mark.parametrize("key", sorted(manifests()))
def test_manifest_validates_against_the_kubernetes_schemas(key):
    kubernetes_validate.validate(manifests()[key], K8S_VERSION, strict=True)


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"]["template"]["spec"].__setitem__("hostIPC", "yes"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("imagePolicy", "x"),
    lambda d: d["spec"].pop("selector"),
], ids=["wrong type", "unknown field", "missing field"])
def test_an_invalid_manifest_fails_validation(break_it):
    broken = copy.deepcopy(manifests()["DaemonSet/loracache"])
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_daemon_runs_on_gpu_nodes_sharing_what_workers_need():
    spec = pod(manifests(), "DaemonSet/loracache")
    (daemon,) = spec["containers"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["hostIPC"] is True and spec["hostPID"] is True  # CUDA IPC; clients' pids
    # Every GPU visible by UUID, none claimed from the device plugin: workers claim them.
    env = {e["name"]: e["value"] for e in daemon["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in json.dumps(daemon.get("resources", {}))
    paths = host_paths(spec)
    where = mounts(daemon)
    assert paths[where["/run/loracache"]] == "/run/loracache"
    assert paths[where["/dev/shm"]] == "/dev/shm"
    assert daemon["args"] == ["serve", "--config", "/etc/loracache/config.toml"]


def test_the_daemon_has_the_least_privileges_that_work():
    spec = pod(manifests(), "DaemonSet/loracache")
    (daemon,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsGroup"] == GROUP
    context = daemon["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in json.dumps(spec)
    (init,) = spec["initContainers"]  # root only to hand the hostPath directories over
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                       "add": ["CHOWN", "FOWNER"]}
    assert f"{GROUP}:{GROUP}" in " ".join(init["command"])


def test_the_daemon_is_probed_with_ping_stops_gracefully_and_is_scraped():
    resources = manifests()
    spec = pod(resources, "DaemonSet/loracache")
    (daemon,) = spec["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert daemon[probe]["exec"]["command"] == PING
    assert spec["terminationGracePeriodSeconds"] >= 30
    annotations = resources["DaemonSet/loracache"]["spec"]["template"]["metadata"]["annotations"]
    port = int(config(resources)["metrics_addr"].rpartition(":")[2])
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    assert {"name": "metrics", "containerPort": port} in daemon["ports"]


def test_the_example_worker_reaches_the_daemon():
    resources = manifests()
    daemon_spec = pod(resources, "DaemonSet/loracache")
    spec = pod(resources, "Deployment/loracache-worker-example")
    (worker,) = spec["containers"]
    assert spec["hostIPC"] is True and spec["hostPID"] is True
    assert GROUP in spec["securityContext"]["supplementalGroups"]
    assert spec["nodeSelector"] == daemon_spec["nodeSelector"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    socket = config(resources)["socket"]
    assert env["LORACACHE_SOCKET"] == socket
    socket_dir = str(Path(socket).parent)
    assert host_paths(spec)[mounts(worker)[socket_dir]] == \
        host_paths(daemon_spec)[mounts(daemon_spec["containers"][0])[socket_dir]]
    assert host_paths(spec)[mounts(worker)["/dev/shm"]] == "/dev/shm"
    assert "load_and_fuse_lora" in " ".join(worker["args"])


def test_the_example_workers_code_fuses_through_the_daemon(daemon, lora_dir, tmp_path):
    """The example worker's script, run as written but on a tiny pipeline on the CPU (and
    without its wait loop), leases its LoRA from the daemon."""
    from transformers import CLIPTokenizer

    from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(smallest=True)
    (tmp_path / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    # a model folder as the script loads it: from_pretrained wants a tokenizer
    pipe.register_modules(tokenizer=CLIPTokenizer(str(tmp_path / "vocab.json"),
                                                  str(tmp_path / "merges.txt")))
    pipe.save_pretrained(tmp_path / "sd15")
    save(sd_lora_peft(pipe), lora_dir / "styles" / "ink.safetensors")
    (worker,) = pod(manifests(), "Deployment/loracache-worker-example")["containers"]
    (script,) = worker["args"]
    replaced = {'"/models/sd15"': f'"{tmp_path / "sd15"}"', '.to("cuda")': '.to("cpu")',
                "while True:": "while False:"}
    for old, new in replaced.items():
        assert old in script
        script = script.replace(old, new)
    env = {e["name"]: e["value"] for e in worker["env"]}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO),
                                            **env, "LORACACHE_SOCKET": str(daemon.socket)})
    assert done.returncode == 0, done.stderr
    assert "without sharing" not in done.stderr  # no fallback to a local load
    assert daemon.cpu_stats().loads == 1  # the LoRA was leased from the daemon


# ---------------------------------------------------------------------------------- image


def dockerfile_command(instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of ENTRYPOINT, CMD or HEALTHCHECK ... CMD."""
    text = DOCKERFILE.read_text()
    (line,) = [raw for raw in text.splitlines() if raw.startswith(instruction + " ")]
    return json.loads(re.search(r"(\[.*\])\s*$", line).group(1))


def test_the_image_runs_as_the_loracache_user_and_group():
    text = DOCKERFILE.read_text()
    assert f"--gid {GROUP} loracache" in text and f"--uid {GROUP} --gid loracache" in text
    assert re.search(r"^USER loracache:loracache$", text, re.M)
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\w.-]+-runtime$", text, re.M)


def test_both_variants_pin_the_same_torch_release():
    """The CPU build is pinned to the CUDA base's release, so the variants behave alike, and
    workers on any torch the README supports open the CUDA variant's handles."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=pytorch/pytorch:(\d+\.\d+\.\d+)-", text, re.M).group(1)
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert pinned == base
    assert '"torch==${TORCH_VERSION}"' in text  # the CPU install uses the pin
    check_importer(base, "2.5.0")  # the oldest worker torch the README supports

def test_the_build_context_holds_exactly_what_the_image_copies():
    copied = {source for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
              for source in line.split()[1:-1]}
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out: .git, .venv, tests, LoRA files
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert kept == copied == {"pyproject.toml", "README.md", "daemon", "client", "shared",
                              "systemd/config.toml"}


def test_the_image_entrypoint_serves_and_its_health_check_pings(tmp_path):
    """ENTRYPOINT + CMD with the ConfigMap's config (its paths moved under tmp_path), then
    HEALTHCHECK: healthy while serving, unhealthy once SIGTERM stopped the daemon."""
    resources = manifests()
    config_text = resources["ConfigMap/loracache-config"]["data"]["config.toml"]
    settings = config(resources)
    moved = {key: str(tmp_path / Path(settings[key]).relative_to("/"))
             for key in ("socket", "cache_dir")}
    moved["shm_dir"] = str(Path(tempfile_dir()) / f"lc-deploy-{os.getpid()}")
    for path in (Path(moved["socket"]).parent, Path(moved["cache_dir"]), Path(moved["shm_dir"])):
        path.mkdir(parents=True, exist_ok=True)
    lora_dir = tmp_path / "srv" / "loras"
    lora_dir.mkdir(parents=True)
    for key, value in moved.items():
        config_text = config_text.replace(f'"{settings[key]}"', f'"{value}"')
    config_text = config_text.replace('"/srv/loras"', f'"{lora_dir}"').replace(
        settings["metrics_addr"], "127.0.0.1:0").replace('["cuda"]', '["cpu"]').replace(
        f'"{settings["host_max_bytes"]}"', '"64MiB"')  # no GPU, and a small /dev/shm here
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_text)
    command = [*dockerfile_command("ENTRYPOINT"), *dockerfile_command("CMD")]
    assert command == ["loracache", "serve", "--config", "/etc/loracache/config.toml"]
    command[-1] = str(config_file)
    health = dockerfile_command("HEALTHCHECK --interval=20s --timeout=5s --start-period=60s")
    assert health == ["loracache", "ping"]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "LORACACHE_SOCKET": moved["socket"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "daemon.log"
    with log.open("w") as output:
        daemon = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        healthy = False
        for _ in range(120):
            healthy = subprocess.run(health, env=env, capture_output=True).returncode == 0
            if healthy or daemon.poll() is not None:
                break
        assert healthy, log.read_text()
        probe = [*PING[:-1], moved["socket"]]  # the DaemonSet's probes
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
        daemon.send_signal(signal.SIGTERM)  # what the kubelet sends, then waits the grace
        assert daemon.wait(timeout=30) == 0
        assert subprocess.run(health, env=env, capture_output=True).returncode != 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(moved["shm_dir"], ignore_errors=True)


def test_the_image_check_runs_the_daemon_and_a_worker_as_the_manifests_do():
    """deploy/check-image.sh (run where a container engine is) must check what the cluster
    will run: the same users, group, read-only root, capabilities and shared namespaces."""
    script = REPO / "deploy" / "check-image.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)  # it parses
    assert os.access(script, os.X_OK)
    text = " ".join(script.read_text().replace("\\\n", " ").split())
    resources = manifests()
    daemon_spec = pod(resources, "DaemonSet/loracache")
    worker_spec = pod(resources, "Deployment/loracache-worker-example")
    daemon_user = (f"{daemon_spec['securityContext']['runAsUser']}:"
                   f"{daemon_spec['securityContext']['runAsGroup']}")
    worker_user = (f"{worker_spec['securityContext']['runAsUser']}:"
                   f"{worker_spec['securityContext']['runAsGroup']}")
    assert "read_only=(--read-only --tmpfs /tmp)" in text
    assert (f'run -d --name "$name" "${{read_only[@]}}" --user {daemon_user} --cap-drop ALL '
            "--security-opt no-new-privileges --ipc host --pid host") in text
    assert f'run --rm "${{read_only[@]}}" --ipc host --pid host --user {worker_user}' in text
    assert f"worker --group-add {GROUP} ||" in text
    assert worker_spec["securityContext"]["supplementalGroups"] == [GROUP]


def tempfile_dir() -> str:
    """A tmpfs for the daemon's CPU entries, as /dev/shm is in the pod."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else str(Path("/tmp"))


def test_the_readme_links_the_guide_and_the_guide_applies_this_directory():
    assert "[deploy/README.md](deploy/README.md)" in (REPO / "README.md").read_text()
    guide = (REPO / "deploy" / "README.md").read_text()
    assert "kubectl apply -k deploy/kubernetes" in guide
    for name in re.findall(r"`([\w/-]+\.yaml)`", guide):
        assert (KUBERNETES / name).is_file(), name
