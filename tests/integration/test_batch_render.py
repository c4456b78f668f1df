"""Bulk rendering with Ray Data (local Ray, 2 CPUs, tiny random checkpoints): a 6-row manifest with 2 bad rows
gives 4 mp4s and 2 reported failures; a rerun renders nothing new."""

import csv
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_manifest_render_with_bad_rows_and_resume(ray_local, tmp_path, speech_wav, astronaut_png):
    import cv2
    import soundfile

    from dawn.audio import load_audio
    from dawn.batch_render import run_batch_render
    from dawn.pipeline import RenderOptions
    from dawn.render import init_checkpoints
    from dawn.video import probe

    checkpoints = init_checkpoints(tmp_path / "ckpt", preset="tiny")
    speech = load_audio(speech_wav)
    soundfile.write(str(tmp_path / "one.wav"), speech[8000:24000], 16000)  # 1 s: 25 frames
    soundfile.write(str(tmp_path / "half.wav"), speech[8000:16400], 16000)  # 0.525 s: 13 frames
    (tmp_path / "noise.wav").write_bytes(b"not audio at all" * 64)
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((128, 128, 3), 90, np.uint8))
    rows = [("a", astronaut_png, "one.wav", 1), ("b", astronaut_png, "one.wav", 2),
            ("c", astronaut_png, "half.wav", 3), ("d", "blank.png", "one.wav", 4),  # no face
            ("e", astronaut_png, "noise.wav", 5), ("f", astronaut_png, "one.wav", 6)]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "portrait", "audio", "seed"])
        writer.writerows(rows)
    out = tmp_path / "out"

    results = run_batch_render(manifest, checkpoints, out, options=RenderOptions(steps=2), a2v_batch=2,
                               show_progress=False)
    by_id = {r["id"]: r for r in results}
    assert [r["id"] for r in results] == list("abcdef")
    assert {i: by_id[i]["status"] for i in by_id} == dict(a="done", b="done", c="done", d="failed", e="failed",
                                                          f="done")
    assert "no face found" in by_id["d"]["error"]
    assert "cannot decode audio" in by_id["e"]["error"]
    for render_id, frames in (("a", 25), ("b", 25), ("c", 13), ("f", 25)):
        info = probe(out / f"{render_id}.mp4")
        assert info["frames"] == frames and info["video_codec"] == "h264" and info["has_audio"]
        assert by_id[render_id]["seconds"] > 0 and by_id[render_id]["output"] == str(out / f"{render_id}.mp4")
    assert sorted(p.name for p in out.glob("*.mp4")) == ["a.mp4", "b.mp4", "c.mp4", "f.mp4"]
    assert not list(out.glob(".*"))  # no temporary files left

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["id"], r["status"]) for r in table] == [(r["id"], r["status"]) for r in results]
    parquet = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in parquet] == [r["status"] for r in results]
    assert parquet[3]["error"] == by_id["d"]["error"]

    # a rerun: nothing new is rendered, the bad rows are tried (and reported) again
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    again = run_batch_render(manifest, checkpoints, out, options=RenderOptions(steps=2), show_progress=False)
    assert [r["status"] for r in again] == ["skipped"] * 3 + ["failed"] * 2 + ["skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes


def test_manifest_problems_are_reported(tmp_path, astronaut_png, speech_wav):
    """Rows that cannot be rendered are failed before any work; a manifest without the columns is refused."""
    import json

    from dawn import DawnError
    from dawn.batch_render import check_row, read_manifest
    from dawn.pipeline import RenderOptions

    manifest = tmp_path / "m.jsonl"
    shutil.copy(astronaut_png, tmp_path / astronaut_png.name)  # portraits are relative to the manifest
    lines = [{"id": "ok", "portrait": astronaut_png.name, "audio": str(speech_wav), "seed": 3},
             {"id": "ok", "portrait": "p.png", "audio": "a.wav"}, {"id": "../x", "portrait": "p.png", "audio": "a.wav"},
             {"id": "s", "portrait": "p.png", "audio": "a.wav", "seed": "x"}, {"id": "n", "portrait": "p.png"},
             {"id": "m", "portrait": astronaut_png.name, "audio": "missing.wav"},
             {"id": "e", "portrait": astronaut_png.name, "audio": str(speech_wav), "eta": 7},
             {"id": "o", "portrait": astronaut_png.name, "audio": str(speech_wav), "steps": "3", "sampler": "dpm-solver++"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows, seen, problems = read_manifest(manifest), set(), []
    job_options = RenderOptions(steps=5, eta=0.0)
    for row in rows:
        problems.append(check_row(row, seen, job_options))
        seen.add(row["id"])
    assert rows[0]["portrait"] == str(tmp_path / astronaut_png.name) and rows[0]["audio"] == str(speech_wav)
    assert problems[0] is None and rows[0]["options"] == RenderOptions(steps=5, eta=0.0, seed=3)
    assert "duplicate id" in problems[1] and "bad id" in problems[2]
    assert problems[3] == "seed must be an integer, got 'x'"
    assert "required" in problems[4]
    assert "not found" in problems[5] and "missing.wav" in problems[5]
    assert problems[6] == "eta must be between 0 and 1, got 7"
    assert problems[7] is None and rows[7]["options"] == RenderOptions(steps=3, eta=0.0, sampler="dpm-solver++")
    (tmp_path / "bad.csv").write_text("name,audio\nx,a.wav\n")
    with pytest.raises(DawnError, match="lacks the column"):
        read_manifest(tmp_path / "bad.csv")


def test_dawn_batch_render_command_reports_bad_input(tmp_path, capsys):
    """`dawn batch-render` takes the job's flags and names the bad input (exit 2) before starting Ray."""
    import importlib.util
    from pathlib import Path

    from dawn.cli import build_parser, main
    from dawn.render import init_checkpoints

    spec = importlib.util.spec_from_file_location("batch_job", Path(__file__).parents[2] / "jobs" / "batch_render.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--manifest", "m.csv", "--checkpoints", "c", "--output", "o", "--a2v-actors", "2", "--eta", "0"]
    from_cli = vars(build_parser().parse_args(["batch-render", *argv]))
    assert from_cli.pop("command") == "batch-render" and from_cli.pop("func") is not None
    assert job.COMMAND == ["batch-render"]  # the job script runs `dawn batch-render ARGS`
    assert from_cli["a2v_actors"] == 2 and from_cli["eta"] == 0

    output = tmp_path / "renders"
    assert main(["batch-render", "--manifest", "m.csv", "--checkpoints", str(tmp_path / "none"),
                 "--output", str(output)]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    checkpoints = init_checkpoints(tmp_path / "ckpt", preset="tiny", hubert=False)
    (tmp_path / "bad.csv").write_text("name,audio\nx,a.wav\n")
    assert main(["batch-render", "--manifest", str(tmp_path / "bad.csv"), "--checkpoints", str(checkpoints),
                 "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dawn batch-render: error:") and "bad.csv" in error and "lacks the column" in error
