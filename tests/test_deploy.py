"""The deployment files, checked by what can be checked without a Docker engine or a cluster:
the Dockerfile is linted and its final stage reproduced (user, working directory, volume,
environment, health check, SIGTERM), the Kubernetes manifests validated against the
schemas, the compose file's settings checked against the bridge's own."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_state import free_port, serving

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def final_stage() -> dict[str, list[str]]:
    """The Dockerfile's last stage: instruction -> its arguments, in order (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages = re.split(r"^FROM ", text, flags=re.M)
    stage: dict[str, list[str]] = {}
    for line in stages[-1].splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            stage.setdefault(instruction, []).append(rest.strip())
    return stage


def test_the_dockerfile_passes_hadolint_and_builds_in_two_stages() -> None:
    linted = subprocess.run(
        [BIN / "hadolint", ROOT / "Dockerfile"], capture_output=True, text=True, timeout=60
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS build$", text, flags=re.M) and "COPY --from=build" in text
    # The build stage compiles the C resampling kernel (setup.py); the final stage has no compiler.
    build = text.split("COPY --from=build")[0].split("FROM ")[1]
    assert "setup.py" in build and re.search(r"apt-get install .*\bgcc\b", build.replace("\\\n", " "))
    stage = final_stage()
    assert not any("pytest" in run or "gcc" in run or "[test]" in run for run in stage["RUN"])
    [user] = stage["USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"  # numeric and not root
    assert stage["ENTRYPOINT"][0].startswith("[")  # exec form: the bridge is PID 1 and gets SIGTERM


def as_user(uid: int, gid: int) -> list[str]:
    """Run as `uid`:`gid` with no groups. The test's interpreter may live under /root (mode
    700 here, unlike the image's /usr/local): the process keeps only the right to read and
    traverse (CAP_DAC_READ_SEARCH), never to write, so where it can write is still exactly
    what the image's ownership allows."""
    caps = "+dac_read_search"
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="starting the service as another user needs root")
async def test_the_image_starts_as_its_unprivileged_user(tmp_path: Path) -> None:
    """The final stage's user, working directory, volume and environment, reproduced with
    the installed package: the service starts, writes its records on the volume, passes
    its HEALTHCHECK and drains on SIGTERM."""
    stage = final_stage()
    uid, gid = (int(part) for part in stage["USER"][0].split(":"))
    [volume] = re.findall(r'"([^"]+)"', stage["VOLUME"][0])
    data = tmp_path / "data"  # stands in for the image's volume
    data.mkdir()
    os.chown(data, uid, gid)
    os.chmod(tmp_path, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))}
    for assignments in stage["ENV"]:
        for assignment in shlex.split(assignments):
            name, _, value = assignment.partition("=")
            env[name] = value.replace(volume, str(data))
    assert env["IVR_DATABASE_PATH"].startswith(str(data))  # an absolute path on the volume
    env["HOME"] = str(data)
    port = free_port()
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]  # the CMD, on loopback
    server = subprocess.Popen(
        [*as_user(uid, gid), str(BIN / "ivr-bridge"), *command],
        env=env,
        cwd=stage["WORKDIR"][0].replace(volume, str(data)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await serving(port)
        [check] = stage["HEALTHCHECK"]
        probe = check.split("CMD ", 1)[1]
        args = [arg.replace("8080", str(port)) for arg in __import__("json").loads(probe)]
        health = subprocess.run([*as_user(uid, gid), *args], env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
        records = Path(env["IVR_DATABASE_PATH"])
        assert records.exists() and records.stat().st_uid == uid
        server.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(server.communicate, timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0, output.decode()[-2000:]
    assert b"Traceback" not in output


@pytest.mark.skipif(os.geteuid() != 0, reason="starting the service as another user needs root")
def test_the_old_layout_fails_as_the_unprivileged_user(tmp_path: Path) -> None:
    """What the image did before: a root-owned working directory and the relative default
    database path. The reproduction above would catch it: start-up exits 2, one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))}
    os.chmod(tmp_path, 0o755)  # root-owned, not writable by the user
    done = subprocess.run(
        [*as_user(10001, 10001), str(BIN / "ivr-bridge"), "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "IVR_DATABASE_PATH" in done.stderr and "Traceback" not in done.stderr


# -- manifests and settings ----------------------------------------------------------------


def _known() -> set[str]:
    from ivr_bridge.settings import Settings

    return Settings.variable_names()


def test_the_kubernetes_manifests_validate_against_the_schemas() -> None:
    import yaml

    folder = ROOT / "deploy" / "kubernetes"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = [folder / name for name in kustomization["resources"]]
    checked = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    documents = {d["kind"]: d for f in files for d in yaml.safe_load_all(f.read_text())}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret"} <= set(
        documents
    )
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    drain = float(documents["ConfigMap"]["data"]["IVR_DRAIN_TIMEOUT_S"])
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > drain + pause  # the drain is never cut short
    assert pod["securityContext"]["runAsUser"] == int(final_stage()["USER"][0].split(":")[0])
    named = set(documents["ConfigMap"]["data"]) | set(documents["Secret"]["stringData"])
    named |= {e["name"] for e in container["env"]}
    assert named <= _known(), named - _known()  # no misspelt setting


def test_compose_and_the_env_example_name_only_real_settings() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    bridge = compose["services"]["bridge"]
    assert bridge["deploy"]["replicas"] >= 2 and {"postgres", "redis", "balancer"} <= set(compose["services"])
    assert set(bridge["environment"]) <= _known()
    example = (ROOT / "deploy" / ".env.example").read_text()
    listed = {
        m for m in re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example, flags=re.M) if m != "POSTGRES_PASSWORD"
    }
    assert listed == _known(), listed ^ _known()  # every setting, and nothing else
    grace = int(bridge["stop_grace_period"].rstrip("s"))
    assert grace > 30  # IVR_DRAIN_TIMEOUT_S's default


def test_the_readme_settings_table_is_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, flags=re.M))
    assert table == _known(), table ^ _known()


def test_the_compose_load_balancer_configuration_is_valid() -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    checked = subprocess.run(
        [haproxy, "-c", "-f", ROOT / "deploy" / "haproxy.cfg"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    assert "option httpchk GET /readyz" in config and "timeout tunnel" in config  # drains, long calls
