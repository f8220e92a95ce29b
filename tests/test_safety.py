"""The safety contract on every command that writes (the issue "Nothing lost, nobody let in"):
folders have owners, so every writer refuses every other writer's output and a folder of user
files without changing a byte of it; a writer replaces its own output and leaves files put
beside it alone; unwritable and full outputs end in one line that names the path and the cause,
with the previous checkpoint intact. Each defect the review found is named in the test that
guards it ("defect N")."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import STARTUP, one_line_error, run_fmkit, train_args, write_image

from fmkit import Condition, DataSpec, Generator, checkpoint
from fmkit.folders import MARK
from fmkit.generator import ModelSpec, build_backbone

pytest.importorskip("diffusers", reason="the export extra (diffusers) is not installed")

# A UNet diffusers can express (see test_export.py), still small enough to train in seconds.
EXPORTABLE = [
    "--backbone-opt", "base_channels=64", "--backbone-opt", "time_emb_dim=64",
    "--backbone-opt", "channel_mult=1,1", "--backbone-opt", "attn_resolutions=8",
    "--backbone-opt", "num_res_blocks=1",
]  # fmt: skip


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder): what must not change."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


class Workspace:
    """The inputs every writer needs, made once: an image folder, a class-per-folder tree, a
    trained model that every exporter can express, random Inception weights."""

    def __init__(self, root: Path, run_cli) -> None:
        from conftest import benchmark

        self.root = root
        self.faces = root / "faces"
        for i in range(16):
            write_image(self.faces / f"{i:02d}.png", size=(16, 16), color=(i * 15, 90, 200 - i * 9))
        self.classes = root / "classes"
        for i in range(8):
            name = "red" if i % 2 else "blue"
            write_image(
                self.classes / name / f"{i}.png", size=(16, 16), color=(200 * (i % 2), 60, 90)
            )
        self.model = root / "model-run"
        result = run_cli(*train_args(self.faces, self.model, "--max-steps", 2, *EXPORTABLE))
        assert result.exit_code == 0, result.output
        self.weights = benchmark("gpu").random_inception(root / "inception.pth")
        self.cache = root / "fid-cache"

    def args(self, writer: str, out: Path) -> list:
        """The command line of `writer` writing `out`."""
        model, faces = self.model, self.faces
        return {
            "train": train_args(faces, out, "--max-steps", 1),
            "sample": ["sample", "--checkpoint", model, "--output", out, "--num-samples", 2,
                       "--steps", 2],
            "prepare": ["prepare", "folder", "--data-dir", faces, "--image-size", 16,
                        "--out", out],
            "reflow": ["reflow", "--teacher", model, "--num-pairs", 4, "--out", out,
                       "--solver", "euler", "--steps", 2, "--batch-size", 4],
            "export": ["export", "--checkpoint", model, "--out", out],
            "export-diffusers": ["export", "--checkpoint", model, "--out", out,
                                 "--format", "diffusers"],
            "export-onnx": ["export", "--checkpoint", model, "--out", out, "--format", "onnx"],
            "sweep": ["eval", "sweep", "--checkpoint", model, "--out", out, "--solvers",
                      "euler:2", "--num-samples", 4, "--batch-size", 4, "--inception-weights",
                      self.weights, "--cache-dir", self.cache],
            "shards": ["prepare", "imagenet", "--src", self.classes, "--out", out,
                       "--per-shard", 4],
        }[writer]  # fmt: skip


WRITERS = [
    "train", "sample", "prepare", "reflow", "export", "export-diffusers", "export-onnx",
    "sweep", "shards",
]  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    def run_cli(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return Workspace(tmp_path_factory.mktemp("safety"), run_cli)


@pytest.fixture(scope="module")
def outputs(work, tmp_path_factory):
    """One output folder of every writer, and a folder of user files."""
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("outputs")
    made = {}
    for writer in WRITERS:
        result = CliRunner().invoke(cli, [str(a) for a in work.args(writer, root / writer)])
        assert result.exit_code == 0, (writer, result.output)
        assert (root / writer / MARK).is_file(), writer
        made[writer] = root / writer
    user = root / "user"
    (user / "notes").mkdir(parents=True)
    (user / "a.tex").write_text("\\documentclass{article}\n")
    (user / "notes" / "config.json").write_text('{"mine": true}\n')
    made["user"] = user
    return made


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_every_other_output_and_user_files(
    writer, work, outputs, tmp_path, run_cli
):
    """Defects 1 and 2: `prepare --out` deleted whatever the folder held; train wrote its
    config.json into an exported model folder and export its config.json into a run."""
    for owner, folder in outputs.items():
        if owner == writer:
            continue
        target = tmp_path / owner
        shutil.copytree(folder, target)
        before = tree(target)
        line = one_line_error(run_cli(*work.args(writer, target)))
        assert str(target) in line, (writer, owner, line)
        assert tree(target) == before, (writer, owner)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_rewrites_its_own_output_and_keeps_what_a_user_put_beside_it(
    writer, work, outputs, tmp_path, run_cli
):
    target = tmp_path / writer
    shutil.copytree(outputs[writer], target)
    (target / "mine.txt").write_text("keep me")
    args = work.args(writer, target)
    if writer == "train":  # an earlier run is continued, never overwritten
        args = [*train_args(work.faces, target, "--max-steps", 2), "--resume"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert (target / "mine.txt").read_text() == "keep me"
    recorded = json.loads((target / MARK).read_text())["files"]
    assert "mine.txt" not in recorded and recorded


def test_folders_written_before_marks_are_recognised(work, outputs, tmp_path, run_cli):
    """Runs, arrays, pair folders and exports of earlier fmkit versions carry no mark: their
    own writer still continues or replaces them (defect 1: only a prepared array is
    replaced), and the others still refuse them. (Samples, sweeps and shards are not taken
    back: see test_a_folder_of_pngs_from_elsewhere_is_never_taken_for_samples.)"""
    for writer in ("train", "prepare", "reflow", "export", "export-diffusers", "export-onnx"):
        target = tmp_path / writer
        shutil.copytree(outputs[writer], target)
        (target / MARK).unlink()
        before = tree(target)
        one_line_error(run_cli(*work.args("sample", target)))
        assert tree(target) == before
        args = work.args(writer, target)
        if writer == "train":
            args = [*train_args(work.faces, target, "--max-steps", 2), "--resume"]
        result = run_cli(*args)
        assert result.exit_code == 0, (writer, result.output)


def test_prepare_never_writes_into_or_over_its_input(work, tmp_path, run_cli):
    """Defect 1: `--out` equal to `--data-dir` deleted the source images (exit 0)."""
    images = tmp_path / "imgs"
    shutil.copytree(work.faces, images)
    before = tree(tmp_path)
    for out in (images, images / "inside", tmp_path):
        args = ["prepare", "folder", "--data-dir", images, "--image-size", 16, "--out", out]
        assert "overlap" in one_line_error(run_cli(*args))
        assert tree(tmp_path) == before


def test_a_conditional_diffusers_export_over_an_unconditional_one_leaves_no_stale_file(
    work, outputs, tmp_path, run_cli
):
    """Defect 2: the stale model_index.json made diffusers build the wrong pipeline."""
    target = tmp_path / "d"
    shutil.copytree(outputs["export-diffusers"], target)
    assert (target / "model_index.json").is_file()  # the unconditional export's pipeline
    conditional = tmp_path / "cls-run"
    result = run_cli("train", "--dataset", "folder", "--data-dir", work.classes, "--image-size",
                     16, "--batch-size", 4, "--max-steps", 1, "--num-samples", 2,
                     "--sample-steps", 1, "--condition", "class", "--output", conditional,
                     *EXPORTABLE)  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("export", "--checkpoint", conditional, "--out", target, "--format",
                     "diffusers")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (target / "model_index.json").exists()
    assert sorted(p.name for p in target.iterdir()) == [MARK, "README.md", "scheduler", "unet"]


def test_export_reports_the_size_of_what_it_wrote(work, outputs, tmp_path, run_cli):
    """Defect 2: the size summed every file in --out, a user's 3 MiB file included."""
    for writer in ("export", "export-diffusers"):
        target = tmp_path / writer
        shutil.copytree(outputs[writer], target)
        (target / "big.bin").write_bytes(b"\0" * 3 * 2**20)
        result = run_cli(*work.args(writer, target))
        assert result.exit_code == 0, result.output
        (mib,) = re.findall(r"([\d.]+) MiB", result.output)
        written = json.loads((target / MARK).read_text())["files"]
        size = sum(f.stat().st_size for n in written for f in [target / n, *(target / n).rglob("*")]
                   if f.is_file())  # fmt: skip
        assert float(mib) == pytest.approx(size / 2**20, abs=0.06), (writer, result.output)


def test_resume_with_nothing_to_resume_is_an_error(work, tmp_path, run_cli):
    """Defect 3: `--resume` with a mistyped --output trained from scratch, silently."""
    for out in (tmp_path / "typo", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        line = one_line_error(run_cli(*train_args(work.faces, out, "--max-steps", 1), "--resume"))
        assert "nothing to continue" in line
    assert not (tmp_path / "typo").exists() and not any((tmp_path / "empty").iterdir())


def test_a_run_that_fails_at_its_first_step_writes_nothing(work, tmp_path, run_cli):
    """Defect 4: errors found by the model or the objective came after config.json and
    metrics.jsonl were written and the progress bar had started."""
    out = tmp_path / "run"
    line = one_line_error(
        run_cli(*train_args(work.faces, out, "--objective", "reflow", "--max-steps", 1))
    )
    assert "pairs" in line and not out.exists()


def test_reflow_refuses_to_extend_pairs_of_other_teacher_weights(work, tmp_path, run_cli):
    """Defect 8: the teacher was recorded by its path only, and resuming the teacher's run
    rewrites checkpoint_final.safetensors at that path."""
    teacher = tmp_path / "teacher"
    shutil.copytree(work.model, teacher)
    pairs = tmp_path / "pairs"
    args = ["reflow", "--teacher", teacher, "--num-pairs", 4, "--out", pairs, "--solver",
            "euler", "--steps", 2, "--batch-size", 4]  # fmt: skip
    assert run_cli(*args).exit_code == 0
    record = json.loads((pairs / "pairs.json").read_text())
    assert record["teacher_step"] == 2 and len(record["teacher_weights"]) == 64
    assert run_cli(*args).exit_code == 0  # the same weights: nothing to do
    resumed = run_cli(*train_args(work.faces, teacher, "--max-steps", 3, *EXPORTABLE), "--resume")
    assert resumed.exit_code == 0, resumed.output
    before = tree(pairs)
    assert "other teacher weights" in one_line_error(run_cli(*args))
    assert tree(pairs) == before


def test_files_get_the_permissions_the_umask_gives(work, tmp_path):
    """Defect 11: under umask 002 an export's model.safetensors was 0600, its config 0664."""
    script = "import os, sys; os.umask(0o002); exec(os.environ['RUN_MANY'])"
    formats = ("fmkit", "diffusers")  # (every staged export gets the same treatment)
    commands = [["export", "--checkpoint", str(work.model), "--out", str(tmp_path / fmt),
                 "--format", fmt] for fmt in formats]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RUN_MANY": RUN_MANY})  # fmt: skip
    assert all(code == 0 for code, *_ in json.loads(proc.stdout.splitlines()[-1])), proc.stdout
    for fmt in formats:
        out = tmp_path / fmt
        modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")
                 if p.is_file()}  # fmt: skip
        assert modes and set(modes.values()) == {0o664}, (fmt, modes)


def test_class_names_win_over_indices(tmp_path, run_cli):
    """Defect 11: `--cond class=2` meant index 2, not the class named "2" (folders 0..11 sort
    0, 1, 10, 11, 2, ...), while the demo sent names; an index is spelled class=#2."""
    names = tuple(sorted(str(i) for i in range(12)))  # "0", "1", "10", "11", "2", ...
    spec = ModelSpec(
        "unet", {**_tiny(), "num_res_blocks": 1}, DataSpec(3, 16, Condition("class", names))
    )
    generator = Generator(spec, build_backbone(spec).eval())
    assert generator.encode({"class": "2"}, 1)["class"].tolist() == [names.index("2")] == [4]
    assert generator.encode({"class": "#2"}, 1)["class"].tolist() == [2]
    assert generator.encode({"class": 2}, 1)["class"].tolist() == [2]  # the API: an int index
    generator.save_pretrained(tmp_path / "model")
    ok = run_cli("sample", "--checkpoint", tmp_path / "model", "--cond", "class=11",
                 "--num-samples", 1, "--steps", 1, "--output", tmp_path / "s")  # fmt: skip
    assert ok.exit_code == 0, ok.output
    line = one_line_error(run_cli("sample", "--checkpoint", tmp_path / "model", "--cond",
                                  "class=#12", "--output", tmp_path / "t"))  # fmt: skip
    assert "class=#INDEX" in line and not (tmp_path / "t").exists()


def _tiny() -> dict:
    return {"base_channels": 8, "channel_mult": (1, 2), "attn_resolutions": (8,)}


# Unwritable and full outputs (defect 10), on a real read-only mount and a real full tmpfs in
# a mount namespace of the test's own (`unshare`), so root, who ignores permissions, sees them.


def _unshare() -> list[str]:
    for command in (["unshare", "-rm"], ["unshare", "-m"]):
        try:
            ok = subprocess.run([*command, "true"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0:
            return command
    pytest.skip("needs `unshare` to mount a read-only or tiny filesystem for the test")


# The commands of a namespace test run in one Python process (importing torch once), through
# the same click group as the console script; each command's exit code and output come back.
RUN_MANY = """
import json, sys
from click.testing import CliRunner
from fmkit.cli import cli
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli, args)
    results.append([result.exit_code, result.output, repr(result.exception)])
print(json.dumps(results))
"""


def run_many(commands: list[list], mount: Path, size: str, after: str = "") -> tuple[list, str]:
    """Run CLI `commands` where `mount` is a fresh tmpfs of `size` ("64k", "1m,ro", ...); then
    the shell commands `after` (inside the namespace, before the mount goes). Returns each
    command's [exit code, output, exception] and what `after` printed."""
    batch = json.dumps([[str(a) for a in args] for args in commands])
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mount} && $PYTHON -c \"$RUN_MANY\" '{batch}' "
        f"&& echo ===after=== && {after or 'true'}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_") or k == "FMKIT_CACHE"}
    env.update(PYTHON=sys.executable, RUN_MANY=RUN_MANY)
    proc = subprocess.run([*_unshare(), "sh", "-c", script], capture_output=True, text=True,
                          env=env, timeout=600, cwd=mount.parent)  # fmt: skip
    assert "===after===" in proc.stdout, proc.stdout + proc.stderr
    results, after_output = proc.stdout.split("===after===")
    return json.loads(results.strip().splitlines()[-1]), after_output


def error_line(result: list) -> str:
    """The one error line of a [exit code, output, exception] that must be a one-line error."""
    code, output, exception = result
    assert code == 1 and "Traceback" not in output, (output, exception)
    lines = [
        x for x in output.splitlines() if x.strip() and "%|" not in x and not x.startswith(STARTUP)
    ]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def test_a_read_only_output_is_one_line_naming_the_path(work, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    writers = ["train", "sample", "reflow", "export", "export-diffusers"]
    results, _ = run_many([work.args(w, mount / w) for w in writers], mount, "1m,ro")
    for writer, result in zip(writers, results, strict=True):
        line = error_line(result)
        assert "Read-only file system" in line and str(mount) in line, (writer, line)


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_last_checkpoint(work, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    run = mount / "run"
    size = (work.model / "checkpoint_final.safetensors").stat().st_size
    args = train_args(work.faces, run, "--max-steps", 4, "--save-every-steps", 1, *EXPORTABLE)
    check = (
        "import sys; from fmkit import checkpoint; "
        "print('kept', checkpoint.load(sys.argv[1])[1]['step'])"
    )
    (result,), after = run_many([args], mount, str(int(size * 1.6)),
                                f'$PYTHON -c "{check}" {run}/checkpoint_step_1.safetensors')  # fmt: skip
    line = error_line(result)
    assert "No space left on device" in line and "checkpoint_step_2" in line
    assert "checkpoint_step_1.safetensors is intact" in line
    assert "kept 1" in after


def test_an_export_on_a_full_disk_is_one_line_and_leaves_nothing(work, tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    formats = ["fmkit", "diffusers", "onnx"]
    commands = [["export", "--checkpoint", work.model, "--out", mount / fmt, "--format", fmt]
                for fmt in formats]  # fmt: skip
    results, after = run_many(commands, mount, "64k", f"ls -A {mount}")
    for fmt, result in zip(formats, results, strict=True):
        assert "No space left on device" in error_line(result), fmt
    assert after.strip() == "", after  # every failed export took its folder away again


def test_the_console_script_turns_a_usage_error_into_one_line(tmp_path):
    proc = run_fmkit("sample", "--checkpoint", tmp_path / "missing", cwd=tmp_path)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "fmkit sample --help" in lines[0]
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_only_run_folder_still_resumes(work, tmp_path, run_cli):
    """A run folder whose config.json was lost (checkpoints only) is still a run."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(work.model / "checkpoint_final.safetensors", out / "checkpoint_step_2.safetensors")
    result = run_cli(*train_args(work.faces, out, "--max-steps", 3, *EXPORTABLE), "--resume")
    assert result.exit_code == 0, result.output
    assert checkpoint.read_metadata(out / "checkpoint_final.safetensors")["step"] == 3


def test_a_mark_cannot_name_files_outside_its_folder(work, outputs, tmp_path, run_cli):
    """A shared model folder whose mark lists "../victim" must not make an export delete it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    target = tmp_path / "export"
    shutil.copytree(outputs["export"], target)
    mark = json.loads((target / MARK).read_text())
    for files in (["../victim"], [str(victim)], [""], ["."], [None]):
        (target / MARK).write_text(json.dumps({**mark, "files": mark["files"] + files}))
        line = one_line_error(run_cli(*work.args("export", target)))
        assert "is damaged" in line
        assert (victim / "keep").read_text() == "mine"


def test_concurrent_writers_of_one_cache_both_succeed(tmp_path):
    """Nodes sharing $FMKIT_CACHE decode the same dataset at the same time: the second to
    finish must neither fail on the first's files nor leave its staging behind."""
    script = textwrap.dedent("""
        import sys, time, torch
        from fmkit.prepared import write_array
        class Slow(torch.utils.data.Dataset):
            def __len__(self): return 6
            def __getitem__(self, i):
                time.sleep(float(sys.argv[2]))
                return torch.zeros(3, 4, 4) + i / 10
        write_array(Slow(), sys.argv[1], {"dataset": "slow"}, progress=False)
        print("ok")
    """)
    out = tmp_path / "cache" / "slow-4px"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), delay], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for delay in ("0.05", "0.2")]  # fmt: skip
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    names = sorted(p.name for p in out.iterdir())
    assert names == [MARK, "images.npy", "meta.json"], names
    assert sorted(json.loads((out / MARK).read_text())["files"]) == ["images.npy", "meta.json"]


def test_an_older_run_with_a_log_beside_it_resumes_and_keeps_the_log(work, outputs, tmp_path,
                                                                     run_cli):  # fmt: skip
    target = tmp_path / "run"
    shutil.copytree(outputs["train"], target)
    (target / MARK).unlink()  # written before marks
    (target / "train.log").write_text("my notes")
    result = run_cli(*train_args(work.faces, target, "--max-steps", 2), "--resume")
    assert result.exit_code == 0, result.output
    assert (target / "train.log").read_text() == "my notes"
    assert "train.log" not in json.loads((target / MARK).read_text())["files"]


def test_a_folder_of_pngs_from_elsewhere_is_never_taken_for_samples(work, tmp_path, run_cli):
    """Another sampler's grid.png + 00000.png... layout: fmkit would have removed the extra."""
    target = tmp_path / "theirs"
    for name in ["grid.png", *(f"{i:05d}.png" for i in range(6))]:
        write_image(target / name, size=(4, 4))
    before = tree(target)
    assert "is not empty" in one_line_error(run_cli(*work.args("sample", target)))
    assert tree(target) == before
