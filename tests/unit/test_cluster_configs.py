"""cluster/*.yaml and serve/config.yaml agree with the code: they parse, the job scripts they run exist and
accept the flags they are given, the Serve application they name builds with their args, and the Ray
versions / image tags match requirements.txt."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster").rglob("*.yaml")) + [REPO / "serve" / "config.yaml"]
JOB_COMMAND = re.compile(r"python3? (jobs/\w+\.py)((?: +[^\s|;&]+)*)")


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
    configs = [("serve/config.yaml", _documents(REPO / "serve" / "config.yaml")[0])]
    for path in CONFIGS:
        for doc in _documents(path):
            if doc.get("kind") == "RayService":
                configs.append((str(path.relative_to(REPO)), yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return configs


def _job_parser(script: str):
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"dawn_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


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
    assert commands, "no job command found in cluster/ (the RayJob's entrypoint should be one)"
    for config, script, argv in commands:
        parser = _job_parser(script)
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{config}: `python {script}` rejects its arguments {argv}")


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

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
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

        args = RecordingArgs({**app["args"], "checkpoints": str(tmp_path / "ckpt"), "output": str(tmp_path / "out")})
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
    assert others, "no RayService found in cluster/"
    for name, config in others:
        assert config["applications"] == reference["applications"], f"{name} differs from serve/config.yaml"
        assert config.get("http_options", {}).get("port") == reference["http_options"]["port"]


def test_ray_versions_and_images_match_requirements():
    ray_version = _pin(REPO / "requirements.txt", "ray")
    assert _pin(REPO / "requirements-gpu.txt", "ray") == ray_version
    python = re.search(r">=\s*3\.(\d+)", (REPO / "pyproject.toml").read_text()).group(1)
    package_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    ray_images = dawn_images = 0
    for path in CONFIGS:
        text = path.read_text()
        for doc in _documents(path):
            for version in _find_key(doc, "rayVersion"):
                assert str(version) == ray_version, f"{path.name}: rayVersion {version}, requirements: {ray_version}"
        for tag in re.findall(r"rayproject/ray:([\w.-]+)", text):  # comments included
            ray_images += 1
            assert tag.startswith(f"{ray_version}-py3{python}"), f"{path.name}: image rayproject/ray:{tag}"
        for tag in re.findall(r"/dawn:([\w.-]+)", text):
            dawn_images += 1
            assert tag.split("-")[0] == package_version, f"{path.name}: image dawn:{tag} vs package {package_version}"
    assert ray_images and dawn_images


def test_launcher_installs_the_pinned_files():
    """The cluster launcher installs requirements-gpu.txt and the mediapipe pin of requirements-nodeps.txt."""
    launcher = _documents(REPO / "cluster" / "launcher" / "aws.yaml")[0]
    setup = " ".join(launcher["setup_commands"])
    for name in re.findall(r"(requirements[\w-]*\.txt)", setup):
        assert (REPO / name).is_file(), f"aws.yaml installs {name}, which is not in the repository"
    mediapipe = re.search(r"mediapipe==([\w.]+)", setup)
    assert mediapipe and mediapipe.group(1) == _pin(REPO / "requirements-nodeps.txt", "mediapipe")
