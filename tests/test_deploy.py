"""The Dockerfile and the Kubernetes manifests under k8s/, checked without a container engine or a cluster:
hadolint on the Dockerfile; every kustomize layout rendered by kubectl and validated against Kubernetes'
schemas (LeaderWorkerSet, a custom resource, by its pod templates and its own documented fields); a
policy over what they render (probes on routes the app has, resources, non-root, pinned images, the token
only from a Secret); and the image's own command line, read from the Dockerfile, run here as a non-root
user in group 0 with an unwritable HOME and the image's cache variables pointing at a fresh folder."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from quart import Quart

from serving.http import chat, completions, interactive, service
from tests.http_fixtures import SMALL_BUCKET_FLAGS, ServerProcess, console_script, free_port, http, openai_client
from tests.test_http_processes import sigterm_during_ten_streams

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LAYOUTS = ("base", "proxy", "lws", "cpu")  # the kustomizations under k8s/
KUBERNETES_VERSION = "1.37"
API_PORT = 23333
# An OpenShift-style UID: arbitrary, with no passwd entry, in group 0.
ARBITRARY_UID = 1000770000


# ---- the Dockerfile ----


@dataclass
class Stage:
    name: str
    base: str  # the FROM image or stage
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append((instruction, arguments.strip()))
    return stages


def image_settings(stages: list[Stage], target: str) -> dict[str, object]:
    """What a container of `target` starts with: ENV (in order), USER, WORKDIR, ENTRYPOINT, CMD, EXPOSE,
    HEALTHCHECK, inherited along the chain of stages it is built FROM."""
    by_name = {stage.name: stage for stage in stages}
    chain: list[Stage] = []
    stage: Stage | None = by_name[target]
    while stage is not None:
        chain.insert(0, stage)
        stage = by_name.get(stage.base)
    settings: dict[str, object] = {"ENV": {}, "EXPOSE": []}
    for stage in chain:
        for instruction, arguments in stage.instructions:
            if instruction == "ENV":
                settings["ENV"].update(dict(pair.split("=", 1) for pair in shlex.split(arguments)))
            elif instruction in ("ENTRYPOINT", "CMD"):
                settings[instruction] = json.loads(arguments)  # exec form only: no shell in between
            elif instruction == "EXPOSE":
                settings["EXPOSE"].extend(arguments.split())
            elif instruction in ("USER", "WORKDIR", "HEALTHCHECK"):
                settings[instruction] = arguments
    return settings


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    run = subprocess.run(
        [console_script("hadolint"), "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr
    # The one rule switched off, with its reason beside it: apt package versions are pinned by the base tag.
    assert set(re.findall(r"hadolint ignore=(\S+)", DOCKERFILE.read_text())) == {"DL3008"}


def test_the_image_has_a_gpu_default_target_and_a_cpu_target(stages: list[Stage]) -> None:
    assert stages[-1].name == "gpu"  # `docker build .` builds the last stage
    installs = {
        stage.name: [arguments for instruction, arguments in stage.instructions if "pip install" in arguments]
        for stage in stages
    }
    by_name = {stage.name: stage for stage in stages}
    for target in ("cpu", "gpu"):  # each final stage takes its own build's virtual environment, and only that
        assert by_name[target].base == "runtime"
        copies = [args for instruction, args in by_name[target].instructions if instruction == "COPY"]
        assert copies == [f"--from=build-{target} /opt/xlserve /opt/xlserve"]
    # The cpu target adds only a C++ compiler (the native decode attention kernel is built on first use),
    # as root, and gives the image back to its user.
    assert by_name["gpu"].instructions == [("COPY", "--from=build-gpu /opt/xlserve /opt/xlserve")]
    cpu = by_name["cpu"].instructions
    assert [instruction for instruction, _ in cpu] == ["USER", "RUN", "USER", "COPY"]
    assert cpu[0][1] == "0" and "install -y --no-install-recommends g++" in cpu[1][1] and cpu[2][1] == "1001"
    assert any("[gpu]" in line for line in installs["build-gpu"])
    assert not any("[gpu]" in line for line in installs["build-cpu"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["jax\[cuda12\]', pyproject, re.M)  # the extra the gpu target installs
    base_image = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert stages[0].base == "${BASE_IMAGE}" and base_image.startswith("nvidia/cuda:")


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_the_image_runs_xlserve_as_a_numeric_non_root_user_with_its_caches_on_one_volume(
    stages: list[Stage], target: str
) -> None:
    image = image_settings(stages, target)
    assert image["ENTRYPOINT"] == ["xlserve", "serve"] and image["CMD"] == ["api_server"]
    # A numeric UID: Kubernetes can check runAsNonRoot only against a number.
    assert str(image["USER"]).isdigit() and int(image["USER"]) != 0
    assert "23333" in image["EXPOSE"]
    assert "/health" in image["HEALTHCHECK"]
    env = image["ENV"]
    for variable in ("HOME", "XDG_CACHE_HOME", "HF_HOME"):
        assert env[variable].startswith("/cache"), variable
    assert env["PATH"].startswith("/opt/xlserve/bin:")
    # Every user in group 0 (OpenShift's arbitrary UIDs) may write /cache: made group 0, group = owner.
    runtime = "\n".join(a for stage in stages if stage.name == "runtime" for i, a in stage.instructions if i == "RUN")
    assert re.search(r"useradd .*--uid " + image["USER"] + r" .*--gid 0", runtime)
    assert re.search(r"chown -R \d+:0 /cache", runtime) and "chmod -R g=u /cache" in runtime
    assert 'VOLUME ["/cache"]' in DOCKERFILE.read_text()


def test_the_build_context_holds_what_the_install_reads(stages: list[Stage]) -> None:
    """.dockerignore lets through exactly what the build COPYs (and no venv, no .git)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    assert patterns[0] == "*"
    copied = {
        source
        for stage in stages
        for instruction, arguments in stage.instructions
        if instruction == "COPY" and "--from" not in arguments
        for source in arguments.split()[:-1]
    }
    assert copied == allowed
    for path in copied:
        assert (ROOT / path).exists(), path


# ---- the manifests ----


def render(layout: str) -> list[dict]:
    run = subprocess.run(
        [console_script("kubectl"), "kustomize", str(ROOT / "k8s" / layout)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {layout: render(layout) for layout in LAYOUTS}


# LeaderWorkerSet's spec fields, by the names of its API (leaderworkerset.x-k8s.io/v1).
LWS_SPEC_FIELDS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE_FIELDS = {
    "leaderTemplate",
    "workerTemplate",
    "size",
    "restartPolicy",
    "subGroupPolicy",
    "volumeClaimTemplates",
    "persistentVolumeClaimRetentionPolicy",
}
LWS_RESTART_POLICIES = {"RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None", "Default"}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
LWS_ENV = {"LWS_GROUP_SIZE", "LWS_WORKER_INDEX", "LWS_LEADER_ADDRESS"}  # what it injects into each container


def validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def check_leader_worker_set(lws: dict) -> None:
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    assert set(spec) <= LWS_SPEC_FIELDS, set(spec) - LWS_SPEC_FIELDS
    template = spec["leaderWorkerTemplate"]
    assert set(template) <= LWS_TEMPLATE_FIELDS, set(template) - LWS_TEMPLATE_FIELDS
    assert isinstance(template["size"], int) and template["size"] >= 2  # a leader and at least one worker
    assert template["restartPolicy"] in LWS_RESTART_POLICIES
    assert spec["startupPolicy"] in LWS_STARTUP_POLICIES
    assert set(spec["rolloutStrategy"]) <= {"type", "rollingUpdateConfiguration"}
    assert set(spec["rolloutStrategy"]["rollingUpdateConfiguration"]) <= {"partition", "maxUnavailable", "maxSurge"}
    for name in ("leaderTemplate", "workerTemplate"):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template[name]})
    mounted = {m["name"] for c in template["workerTemplate"]["spec"]["containers"] for m in c["volumeMounts"]}
    for claim in template["volumeClaimTemplates"]:
        validate({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim})
        assert claim["metadata"]["name"] in mounted  # LWS requires a mount for each claim


def pod_specs(resources: list[dict]) -> Iterator[tuple[str, dict]]:
    for resource in resources:
        if resource["kind"] == "Deployment":
            yield resource["metadata"]["name"], resource["spec"]["template"]["spec"]
        elif resource["kind"] == "LeaderWorkerSet":
            for role in ("leaderTemplate", "workerTemplate"):
                yield f"{resource['metadata']['name']}/{role}", resource["spec"]["leaderWorkerTemplate"][role]["spec"]


def api_server_routes() -> set[str]:
    """The GET routes of the api_server's app (its blueprints on a bare app: no engine needed)."""
    app = Quart("routes")
    for module in (service, chat, completions, interactive):
        app.register_blueprint(module.blueprint)
    return {rule.rule for rule in app.url_map.iter_rules() if "GET" in rule.methods}


# `xlserve serve proxy` (the proxy issue) documents these two probes like the api_server's.
PROXY_ROUTES = {"/health", "/v1/ready"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_renders_and_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict]], layout: str
) -> None:
    kinds = []
    for resource in rendered[layout]:
        kinds.append(resource["kind"])
        if resource["kind"] == "LeaderWorkerSet":
            check_leader_worker_set(resource)
        else:
            validate(resource)
    assert "Secret" in kinds and "Service" in kinds
    assert ("LeaderWorkerSet" if layout == "lws" else "Deployment") in kinds


def test_strict_validation_catches_a_misspelled_field(rendered: dict[str, list[dict]]) -> None:
    deployment = copy.deepcopy(next(r for r in rendered["base"] if r["kind"] == "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["startupProbes"] = container.pop("startupProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_policy_probes_resources_non_root_pinned_images_and_secrets(
    rendered: dict[str, list[dict]], layout: str
) -> None:
    api_routes = api_server_routes()
    assert {"/health", "/v1/ready"} <= api_routes
    specs = list(pod_specs(rendered[layout]))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            where = f"{layout}: {name}/{container['name']}"
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), where
            command = container["args"][0]
            routes = PROXY_ROUTES if command == "proxy" else api_routes
            probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
            for kind, probe in probes.items():
                assert probe["httpGet"]["path"] in routes, (where, kind)
                named = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert probe["httpGet"]["port"] in named, (where, kind)
            assert probes["livenessProbe"]["httpGet"]["path"] == "/health", where
            serves_api = command == "api_server" and not name.endswith("workerTemplate")
            if serves_api:  # ready means compiled and able to serve, not "port open"
                assert probes["readinessProbe"]["httpGet"]["path"] == "/v1/ready", where
                assert probes["startupProbe"]["httpGet"]["path"] == "/v1/ready", where
                startup = probes["startupProbe"]
                # Room for a download and a compile: at least 20 minutes before the kubelet gives up.
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200, where
                assert container["ports"][0]["containerPort"] == API_PORT, where
            assert "preStop" in container["lifecycle"], where
            grace = spec["terminationGracePeriodSeconds"]
            shutdown = container["args"][container["args"].index("--shutdown-timeout") + 1]
            assert grace > float(shutdown) + 5, where  # the preStop pause and the drain both fit
            assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"], where
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if command == "api_server" and layout != "cpu":
                assert gpus and gpus == container["resources"]["requests"]["nvidia.com/gpu"], where
            else:
                assert gpus is None, where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/cache" in mounts and "/tmp" in mounts, where  # the root filesystem is read-only
            if command == "api_server":
                assert "/dev/shm" in mounts, where
            for variable in container.get("env", []):
                if re.search(r"TOKEN|KEY", variable["name"]):  # secrets never as literal values
                    assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], (where, variable)
    secrets = [r for r in rendered[layout] if r["kind"] == "Secret"]
    for secret in secrets:  # placeholders only: the real values are filled in at deploy time
        assert all(re.fullmatch(r"\{\{[A-Z_]+\}\}", value) for value in secret["stringData"].values()), secret


def test_the_proxy_layout_registers_its_api_servers_with_the_proxy(rendered: dict[str, list[dict]]) -> None:
    resources = {(r["kind"], r["metadata"]["name"]): r for r in rendered["proxy"]}
    api = resources[("Deployment", "xlserve")]["spec"]
    assert api["replicas"] >= 2
    args = api["template"]["spec"]["containers"][0]["args"]
    proxy_url = args[args.index("--proxy-url") + 1]
    registry = resources[("Service", proxy_url.split("//")[1].split(":")[0])]["spec"]
    # The proxy is ready only once a node registered, so nodes register through a Service that lists it
    # before it is ready.
    assert registry["publishNotReadyAddresses"] is True
    assert str(registry["ports"][0]["port"]) == proxy_url.rsplit(":", 1)[1]
    proxy = resources[("Deployment", "xlserve-proxy")]["spec"]["template"]["spec"]["containers"][0]
    assert proxy["args"][0] == "proxy"
    admin_key = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in proxy["env"]}["XLSERVE_ADMIN_API_KEYS"]
    api_env = api["template"]["spec"]["containers"][0]["env"]
    assert {v["name"]: v["valueFrom"]["secretKeyRef"] for v in api_env}["XLSERVE_PROXY_API_KEY"] == admin_key
    claim = resources[("PersistentVolumeClaim", "xlserve-cache")]["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]  # pods on several nodes share the cache


def test_the_multi_host_group_takes_its_rank_and_peers_from_leader_worker_set(rendered: dict[str, list[dict]]) -> None:
    [lws] = [r for r in rendered["lws"] if r["kind"] == "LeaderWorkerSet"]
    for role in ("leaderTemplate", "workerTemplate"):
        [container] = lws["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"]
        args = container["args"]
        flags = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        assert flags["--nnodes"] == "$(LWS_GROUP_SIZE)" and flags["--node-rank"] == "$(LWS_WORKER_INDEX)"
        assert flags["--dist-init-addr"].startswith("$(LWS_LEADER_ADDRESS):")
        assert set(re.findall(r"\$\((\w+)\)", " ".join(args))) <= LWS_ENV
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        # --tp counts the devices of every host in the group.
        assert int(flags["--tp"]) == gpus * lws["spec"]["leaderWorkerTemplate"]["size"]
    [service] = [r for r in rendered["lws"] if r["kind"] == "Service"]
    leader_labels = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("leaderworkerset.sigs.k8s.io/name") == lws["metadata"]["name"]
    assert selector.items() <= leader_labels.items()  # requests go to the leaders only


# ---- the image's command line, run here ----


@pytest.fixture()
def cache_volume() -> Iterator[Path]:
    """A fresh folder standing for the image's /cache: owned by group 0 and writable by it, as the image
    makes it; outside pytest's tmp folder, which other users cannot enter."""
    with tempfile.TemporaryDirectory(prefix="xlserve-cache-") as folder:
        os.chmod(folder, 0o770)
        if os.geteuid() == 0:
            os.chown(folder, -1, 0)
        yield Path(folder)


def closed_folders(paths: list[Path]) -> dict[Path, set[str]]:
    """The folders on the way to `paths` that other users may not enter, each with its children on the way."""
    closed: dict[Path, set[str]] = {}
    for path in (p.resolve() for p in paths):
        for parent, child in zip(path.parents, [path, *path.parents], strict=False):
            if not parent.stat().st_mode & stat.S_IXOTH:
                closed.setdefault(parent, set()).add(child.name)
    return closed


def as_arbitrary_uid(command: list[str], reach: list[Path], hold: Path) -> list[str]:
    """`command` run as ARBITRARY_UID in group 0, with no capabilities, able to reach the folders in
    `reach` (this Python, the venv, the checkout, the cache). Where one lies in a folder closed to other users (pyenv
    under /root), a mount namespace of its own (only this process sees it) lays an open tmpfs over that
    folder with just the children on the way bound back in; `hold` keeps the originals within reach
    meanwhile. Nothing outside the process changes."""
    lines = ["set -e"]
    for number, (folder, children) in enumerate(sorted(closed_folders(reach).items())):
        original = hold / str(number)
        lines += [f"mkdir {shlex.quote(str(original))}",
                  f"mount --bind {shlex.quote(str(folder))} {shlex.quote(str(original))}",
                  f"mount -t tmpfs -o mode=755 xlserve-test {shlex.quote(str(folder))}"]
        for child in sorted(children):
            inside = shlex.quote(str(folder / child))
            lines += [f"mkdir {inside}" if (folder / child).is_dir() else f"touch {inside}",
                      f"mount --bind {shlex.quote(str(original / child))} {inside}"]
    lines.append(f'exec setpriv --reuid={ARBITRARY_UID} --regid=0 --clear-groups --no-new-privs -- "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines), "sh", *command]


def as_image_runs_it(image: dict[str, object], cache: Path) -> dict[str, str | None]:
    """The image's environment on this machine: /cache is `cache`, the image's venv is this one; HOME is
    a folder that does not exist (nothing may depend on writing it); variables that would point the
    caches elsewhere are removed."""
    venv_bin = str(Path(sys.executable).parent)
    env: dict[str, str | None] = {
        name: value.replace("/opt/xlserve/bin", venv_bin).replace("$PATH", os.environ["PATH"])
        for name, value in image["ENV"].items()
    }
    env = {name: re.sub(r"^/cache", str(cache), value) for name, value in env.items()}
    env["HOME"] = "/nonexistent/home"
    for variable in ("XLSERVE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "HF_HUB_CACHE", "PYTHONPATH"):
        env[variable] = None
    return env


def test_the_image_command_serves_as_an_arbitrary_uid_in_group_0_and_drains_on_sigterm(
    stages: list[Stage], rendered: dict[str, list[dict]], cache_volume: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    image = image_settings(stages, "cpu")
    env = as_image_runs_it(image, cache_volume)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # `docker run IMAGE api_server --flags`: the arguments after the image replace CMD.
    arguments = [*image["CMD"], "--server-name", "127.0.0.1", "--server-port", str(port), *SMALL_BUCKET_FLAGS,
                 "--max-batch-size", "2", "--shutdown-timeout", "120"]
    command = [*image["ENTRYPOINT"], *arguments]
    as_root = os.geteuid() == 0
    if as_root:  # CI: become what OpenShift runs; otherwise this user already is not root
        reach = [Path(sys.base_prefix), Path(sys.prefix), ROOT, cache_volume]
        command = as_arbitrary_uid(command, reach=reach, hold=hold)
    server = ServerProcess(command, env=env, cwd=cache_volume)
    try:
        server.wait_until(lambda: http.get(f"{base}/health", timeout=5).status_code == 200)
        assert http.get(f"{base}/v1/ready").status_code == 503  # compiling: alive, not ready
        server.wait_ready(base)
        client = openai_client(f"{base}/v1", "none", max_retries=0)
        completion = client.completions.create(
            model="xlserve-demo", prompt="hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert completion.usage.completion_tokens == 4
        # Every probe path the manifests give an api_server answers 200 on the ready server.
        probed = {
            container[kind]["httpGet"]["path"]
            for resources in rendered.values()
            for _, spec in pod_specs(resources)
            for container in spec["containers"]
            if container["args"][0] == "api_server"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert probed == {"/health", "/v1/ready"}
        for path in sorted(probed):
            assert http.get(f"{base}{path}").status_code == 200, path
        # The demo checkpoint went where the image's variables say, written by the server's user.
        [demo] = (cache_volume / "xlserve").glob("demo-v*")
        if as_root:
            assert demo.stat().st_uid == ARBITRARY_UID and demo.stat().st_gid == 0
        assert not Path("/nonexistent").exists()
        for lines in asyncio.run(sigterm_during_ten_streams(server, base)):
            payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"  # finished, not cut
        status = server.process.wait(60)
    finally:
        server.stop()
    assert status == 0, server.output()
