"""The reference assets (tests/assets/reference, or $DAWN_REFERENCE_DIR): complete, and a swapped-in vector set
really drives the conformance tests (a perturbed stored output fails, naming that output)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(__file__).resolve().parent / "test_pbnet.py"  # the fastest conformance module: PBNet
VECTOR, OUTPUT = "pbnet_small", "decoder.output"


def test_assets_are_complete(reference_dir):
    assert sorted(p.name for p in reference_dir.glob("manifest_*.json")) == [
        "manifest_a2v_128.json", "manifest_lfg_128.json", "manifest_pbnet_blink.json", "manifest_pbnet_pose.json"]
    vectors = reference_dir / "vectors"
    tensors, sidecars = {p.stem for p in vectors.glob("*.safetensors")}, {p.stem for p in vectors.glob("*.json")}
    assert tensors == sidecars == {"lfg_small", "pbnet_small", "pbnet_small_blink", "unet_small"}
    for name in tensors:
        meta = json.loads((vectors / f"{name}.json").read_text())
        assert {"config", "outputs", "tolerance"} <= meta.keys(), name


def test_check_outputs_accounts_for_every_output(reference_vector, reference_dir, tmp_path):
    """An output the sidecar lists that a test neither compares nor excludes fails, and so do stale or
    double entries; the stored outputs themselves pass."""
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    shutil.copy(reference_dir / "vectors" / f"{VECTOR}.json", vectors)
    shutil.copy(reference_dir / "vectors" / f"{VECTOR}.safetensors", vectors)
    vector = type(reference_vector(VECTOR))(vectors, VECTOR)
    stored = {name: vector.output(name) for name in vector.outputs}
    vector.check_outputs(stored)

    tensors = load_file(str(vectors / f"{VECTOR}.safetensors"))
    tensors["output.extra.output"] = torch.zeros(3)
    save_file(tensors, str(vectors / f"{VECTOR}.safetensors"))
    meta = json.loads((vectors / f"{VECTOR}.json").read_text())
    meta["outputs"].append(["output.extra.output", [3], "float32"])
    meta["tolerance"]["recommended_atol_float32"]["extra.output"] = 1e-5
    (vectors / f"{VECTOR}.json").write_text(json.dumps(meta))
    grown = type(vector)(vectors, VECTOR)
    with pytest.raises(pytest.fail.Exception, match=r"neither compared nor excluded: \['extra.output'\]"):
        grown.check_outputs(stored)
    grown.check_outputs(stored, excluded={"extra.output": "not produced by dawn"})
    with pytest.raises(pytest.fail.Exception, match=r"both compared and excluded: \['extra.output'\]"):
        grown.check_outputs({**stored, "extra.output": torch.zeros(3)}, excluded={"extra.output": "-"})
    with pytest.raises(pytest.fail.Exception, match=r"excluded outputs the vector does not have: \['gone'\]"):
        vector.check_outputs(stored, excluded={"gone": "-"})
    with pytest.raises(pytest.fail.Exception, match=r"computed outputs the vector does not have: \['extra.output'\]"):
        vector.check_outputs({**stored, "extra.output": torch.zeros(3)})


def _conformance_run(reference: Path) -> subprocess.Popen:
    env = {**os.environ, "DAWN_REFERENCE_DIR": str(reference), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_reference_vectors",
               str(CONFORMANCE)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_swapped_vector_set_drives_the_conformance_tests(reference_dir, tmp_path):
    clean, perturbed = tmp_path / "clean", tmp_path / "perturbed"
    shutil.copytree(reference_dir, clean)
    shutil.copytree(reference_dir, perturbed)
    path = perturbed / "vectors" / f"{VECTOR}.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[f"output.{OUTPUT}"] = tensors[f"output.{OUTPUT}"] + 1e-2
    save_file(tensors, str(path), metadata=metadata)

    runs = {name: _conformance_run(folder) for name, folder in (("clean", clean), ("perturbed", perturbed))}
    logs = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
    assert runs["clean"].returncode == 0 and re.search(r"\b2 passed\b", logs["clean"]), logs["clean"]
    assert runs["perturbed"].returncode == 1 and re.search(r"\b1 failed\b", logs["perturbed"]), logs["perturbed"]
    flagged = set(re.findall(r"^\s*(\S+): max\|ours - reference\| = \S+ > atol", logs["perturbed"], re.M))
    assert flagged == {OUTPUT}, logs["perturbed"]
    assert f"reference vector {VECTOR}:" in logs["perturbed"]
