"""The KubeRay RayJob: its fields checked against KubeRay's ray.io/v1 API, its pod templates
deserialised strictly by the `kubernetes` client's models, every path resolved to the shared
volume as the pods see it (or refused, naming the field), and the entrypoint's prepare step run
on that volume to show every rank would read one RUN/config.yaml."""
from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes  # the dev extra installs it
import pytest
import yaml

from cluster.cli import main

# Field names of KubeRay's ray.io/v1 API, from its reference (ray-project/kuberay, docs/reference/api.md,
# sections RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec; also docs.ray.io "RayJob Quickstart").
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "rayStartParams", "template", "scaleStrategy", "numOfHosts"}

MOUNT = "/mnt/pretrain"


def strict(data: dict, kind: str) -> dict:
    """The object as the kubernetes client reads it and writes it back: a field it does not know is dropped,
    so a difference from the input is a field Kubernetes would not accept."""
    client = kubernetes.client.ApiClient()
    return client.sanitize_for_serialization(client._ApiClient__deserialize(data, kind))


def cluster_yaml(tmp_path: Path, mount: str = MOUNT, **k8s) -> Path:
    path = tmp_path / "k8s.yaml"
    k8s = {"volume": {"claim": "pretrain-shared", "mount_path": mount}, **k8s}
    path.write_text(yaml.safe_dump({"backend": "k8s", "nodes": 2, "gpus_per_node": 8, "cpus_per_node": 32,
                                    "memory_per_node_gb": 512, "k8s": k8s}))
    return path


def submit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["submit", *args, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def rayjob(capsys, *args: str) -> dict:
    code, out, err = submit(capsys, *args)
    assert code == 0, err
    return yaml.safe_load(out)


def pod_config(job: dict) -> dict:
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    return yaml.safe_load(env["PRETRAIN_CONFIG_YAML"])


def templates(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_rayjob_fields_are_kuberay_v1_fields(capsys, tmp_path, repo_root):
    config = str(repo_root / "configs/train/tiny-gpt-cpu.yaml")
    cluster = cluster_yaml(tmp_path, node_selector={"nvidia.com/gpu.product": "H100"},
                           tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                           active_deadline_seconds=86400)
    job = rayjob(capsys, config, "--cluster", str(cluster), "--name", "Big_Run.1", "--set", "train.lr=1e-3",
                 "--set", f"data.path={MOUNT}/data/sample")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and set(job) == {"apiVersion", "kind",
                                                                                        "metadata", "spec"}
    assert strict(job["metadata"], "V1ObjectMeta") == {"name": "big-run-1", "namespace": "default"}
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["activeDeadlineSeconds"] == 86400
    assert set(spec["rayClusterSpec"]) <= RAYCLUSTER_SPEC
    head, (workers,) = spec["rayClusterSpec"]["headGroupSpec"], spec["rayClusterSpec"]["workerGroupSpecs"]
    assert set(head) <= HEAD_GROUP_SPEC and set(workers) <= WORKER_GROUP_SPEC
    for params in (head["rayStartParams"], workers["rayStartParams"]):  # map[string]string in the CRD
        assert all(isinstance(v, str) for v in params.values())
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    entry = shlex.split(spec["entrypoint"])
    assert entry[:4] == ["python", "-m", "cluster.submit.ray_launcher", "train"]
    assert entry[entry.index("--nodes") + 1] == "2" and entry[entry.index("--gpus-per-node") + 1] == "8"
    config = pod_config(job)
    assert config["train"]["lr"] == 1e-3 and config["model"]["name"] == "tiny-gpt"
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert "nodeSelector" not in head["template"]["spec"]  # the GPU-less head is not pinned to GPU nodes
    assert worker["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "wandb"
    assert "WANDB_API_KEY=" not in spec["runtimeEnvYAML"]


def test_pod_templates_deserialise_strictly_with_the_kubernetes_client(capsys, tmp_path, repo_root):
    cluster = cluster_yaml(tmp_path, requests={"cpu": "30", "memory": "480Gi"},
                           tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                         "tolerationSeconds": 60}],
                           head_tolerations=[{"key": "dedicated", "value": "ray", "effect": "NoSchedule"}])
    job = rayjob(capsys, str(repo_root / "configs/train/tiny-gpt-cpu.yaml"), "--cluster", str(cluster),
                 "--set", f"data.path={MOUNT}/data/sample")
    for template in templates(job):
        assert strict(template, "V1PodTemplateSpec") == template
    worker = templates(job)[1]["spec"]
    assert worker["tolerations"][1]["tolerationSeconds"] == 60
    assert worker["containers"][0]["resources"]["requests"]["cpu"] == "30"
    # The check has teeth: a misspelt field is dropped by the client, so the round trip differs.
    typo = yaml.safe_load(yaml.safe_dump(templates(job)[0]))
    typo["spec"]["containers"][0]["volumeMount"] = typo["spec"]["containers"][0].pop("volumeMounts")
    assert strict(typo, "V1PodTemplateSpec") != typo


def test_every_path_resolves_on_the_volume_and_the_ranks_read_one_config(capsys, tmp_path, repo_root):
    """The volume is a local directory here and `nfs` a second view of it (as an NFS mount of the PVC would
    be), mapped by path_map. The RayJob must name only paths on the volume, and the entrypoint's prepare
    step, run from the RayJob's own config text, must leave RUN/config.yaml on it for every rank."""
    from cluster.submit.prepare import prepare
    from trainer.configio import read_run_config

    volume = tmp_path / "pvc"
    (volume / "shards").mkdir(parents=True)
    (volume / "shards" / "manifest.json").write_text("{}")  # prepare only checks that the data run finished
    (tmp_path / "nfs").symlink_to(volume)
    cluster = cluster_yaml(tmp_path, mount=str(volume), path_map={str(tmp_path / "nfs"): str(volume)})
    job = rayjob(capsys, str(repo_root / "configs/train/tiny-gpt-cpu.yaml"), "--cluster", str(cluster),
                 "--nodes", "2", "--gpus-per-node", "1", "--run-dir", "runs/r 1;$(touch INJECTED)",
                 "--set", f"data.path={tmp_path / 'nfs' / 'shards'}")
    entry = shlex.split(job["spec"]["entrypoint"])
    run_dir = entry[entry.index("--out") + 1]
    config_text = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["PRETRAIN_CONFIG_YAML"]
    assert run_dir == str(volume / "runs" / "r 1;$(touch INJECTED)")  # one argument, quoted for the shell
    assert yaml.safe_load(config_text)["data"]["path"] == str(volume / "shards")
    for template in templates(job):  # every pod mounts the one claim where the paths point
        spec = template["spec"]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == str(volume)]
        (claim,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert claim["persistentVolumeClaim"]["claimName"] == "pretrain-shared"
    # What ray_launcher.train does on the head before it starts any rank: the config text to a file, then prepare.
    config = tmp_path / "head-tmp" / "config.yaml"
    config.parent.mkdir()
    config.write_text(config_text)
    prepare(str(config), run_dir, world=2)
    saved = read_run_config(Path(run_dir) / "config.yaml")  # what each rank reads
    assert saved.data.path == str(volume / "shards") and saved.parallel.data_parallel_size == 2


def test_data_job_paths_map_onto_the_volume(capsys, tmp_path, data_config, shared_data):
    cluster = cluster_yaml(tmp_path, path_map={str(shared_data): f"{MOUNT}/reference"})
    job = rayjob(capsys, str(data_config), "--cluster", str(cluster))
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[3] == "data" and entry[entry.index("--out") + 1] == f"{MOUNT}/data/out"
    config = pod_config(job)
    assert config["output"] == f"{MOUNT}/data/out"
    assert config["tokenizer"]["path"] == f"{MOUNT}/reference/tokenizer/gpt2/r50k_base.tiktoken"
    assert [s["inputs"] for s in config["sources"]] == [[f"{MOUNT}/reference/books/austen_p*.txt"],
                                                        [f"{MOUNT}/reference/wiki/*.bz2"]]


@pytest.mark.parametrize("args, field", [
    (["--set", "data.path=/home/me/shards"], "data.path: /home/me/shards is not on the shared volume"),
    (["--set", f"data.path={MOUNT}/d", "--run-dir", "/scratch/run"], "--run-dir: /scratch/run is not on the"),
    (["--set", f"data.path={MOUNT}/d", "--run-dir", f"{MOUNT}/../etc/run"], "--run-dir: /mnt/etc/run is not on the"),
], ids=["local-data", "local-run-dir", "escapes-the-volume"])
def test_paths_the_pods_cannot_read_are_refused(capsys, tmp_path, repo_root, args, field):
    code, out, err = submit(capsys, str(repo_root / "configs/train/tiny-gpt-cpu.yaml"),
                            "--cluster", str(cluster_yaml(tmp_path)), *args)
    assert code == 2 and out == "" and err.startswith(f"error: {field}") and "Traceback" not in err


def test_data_job_with_a_local_tokenizer_is_refused(capsys, tmp_path, data_config, shared_data):
    cluster = cluster_yaml(tmp_path, path_map={str(shared_data / "books"): f"{MOUNT}/books"})
    code, _, err = submit(capsys, str(data_config), "--cluster", str(cluster))
    assert code == 2 and err.startswith(f"error: tokenizer.path: {shared_data}/tokenizer/")


@pytest.mark.parametrize("k8s, message", [
    ({}, "cluster.k8s.volume: backend k8s needs a shared volume"),
    ({"volume": {"claim": "Shared_Data"}}, "k8s.volume.claim: 'Shared_Data' is not a Kubernetes object name"),
    ({"volume": {"claim": "c", "mount_path": "data"}}, "k8s.volume.mount_path: 'data' is not an absolute path"),
    ({"volume": {"claim": "c"}, "path_map": {"/nfs": "/data"}}, "k8s: path_map./nfs: /data is not on the shared"),
    ({"volume": {"claim": "c"}, "requests": {"cpu": "40"}}, "k8s.requests.cpu: 40 is above its limit 32"),
    ({"volume": {"claim": "c"}, "limits": {"memory": "64 GB"}}, "k8s.limits: '64 GB' is not a Kubernetes quantity"),
    ({"volume": {"claim": "c"}, "limits": {"nvidia.com/gpu": 4}}, "k8s: limits.nvidia.com/gpu: set GPUs with"),
    ({"volume": {"claim": "c"}, "tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]},
     "k8s.tolerations.0: a toleration with operator Exists takes no value"),
    ({"volume": {"claim": "c"}, "tolerations": [{"key": "a", "efect": "NoSchedule"}]},
     "k8s.tolerations.0.efect: unknown key"),
], ids=["no-volume", "claim", "mount", "path-map", "request-over-limit", "quantity", "gpu", "toleration", "typo"])
def test_k8s_config_mistakes_name_the_field(capsys, tmp_path, repo_root, k8s, message):
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump({"backend": "k8s", "cpus_per_node": 32, "k8s": k8s}))
    code, _, err = submit(capsys, str(repo_root / "configs/train/tiny-gpt-cpu.yaml"), "--cluster", str(path),
                          "--set", f"data.path={MOUNT}/d")
    assert code == 2 and message in err and "Traceback" not in err, err


def test_shipped_kuberay_config_renders_valid_pods(capsys, repo_root):
    job = rayjob(capsys, str(repo_root / "configs/train/tiny-gpt-cpu.yaml"), "--cluster",
                 str(repo_root / "configs/cluster/kuberay.yaml"), "--set", "data.path=/nfs/pretrain/data/sample")
    assert pod_config(job)["data"]["path"] == f"{MOUNT}/data/sample"
    for template in templates(job):
        assert strict(template, "V1PodTemplateSpec") == template


def test_cluster_file_overlays_the_train_yaml_cluster_section(capsys, tmp_path, repo_root):
    """The volume set in the train YAML's `cluster:` survives a --cluster file that only sets resources."""
    train = yaml.safe_load((repo_root / "configs/train/tiny-gpt-cpu.yaml").read_text())
    train["model"] = str(repo_root / "configs/model/tiny-gpt.yaml")
    train["data"]["path"] = f"{MOUNT}/data/sample"
    train["cluster"] = {"backend": "k8s", "k8s": {"volume": {"claim": "from-train-yaml"}}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    (tmp_path / "resources.yaml").write_text("cpus_per_node: 16\nk8s:\n  requests: {cpu: '12'}\n")
    job = rayjob(capsys, str(tmp_path / "train.yaml"), "--cluster", str(tmp_path / "resources.yaml"))
    _, worker = (t["spec"] for t in templates(job))
    assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == "from-train-yaml"
    assert worker["containers"][0]["resources"] == {"requests": {"cpu": "12", "memory": "64Gi"},
                                                    "limits": {"cpu": "16", "memory": "64Gi"}}
