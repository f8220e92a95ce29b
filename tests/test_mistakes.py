"""A table of user mistakes across every command (the safety issue's "bad input,
table-driven"): each ends in a non-zero exit and one short line, with no traceback, and no
file in the workspace is created or changed. Cases named "defect N" are the review's."""

import pytest
import torch
from conftest import TINY, one_line_error, train_args, write_image

# (id, command line with {placeholders} for the workspace's paths, text the error must hold)
CASES = [
    # fmkit train
    ("train-batch-0", "train --batch-size 0", "--batch-size"),
    ("train-lr-negative", "train --lr -1", "--lr"),
    ("train-device-gpu", "train --device gpu", "--device"),
    ("train-backbone-typo", "train --backbone unte", "did you mean 'unet'"),
    ("train-dataset-unknown", "train --dataset nope", "unknown dataset 'nope'"),
    ("train-opt-no-value", "train --backbone-opt x", "expects KEY=VALUE"),
    ("train-opt-unknown", "train --backbone-opt widht=3", "unknown option 'widht'"),
    ("train-into-model-folder (defect 2)", "train --output {model}", "holds an fmkit model"),
    ("train-into-user-folder", "train --output {user}", "is not empty"),
    ("train-resume-typo (defect 3)", "train --output {ws}/typo --resume", "nothing to continue"),
    ("train-over-checkpoints", "train --output {run}", "already holds checkpoints"),
    ("train-meanflow-no-second-time (defect 4)",
     "train --objective meanflow --backbone-opt two_times=false", "two_times=true"),
    ("train-seed-negative", "train --seed -1", "--seed"),
    ("train-missing-images", "train --data-dir {ws}/missing", "does not exist"),
    ("train-batch-indivisible", "train --batch-size 5 --grad-accum 2", "divide evenly"),
    ("train-classes-without-folders", "train --condition class", "one subfolder per class"),
    ("train-ema-decay-2", "train --ema-decay 2", "--ema-decay"),
    ("train-objective-unknown", "train --objective nope", "unknown objective 'nope'"),
    ("train-flag-not-of-objective", "train --objective meanflow --coupling ot",
     "not an option of objective 'meanflow'"),
    ("train-init-from-missing", "train --init-from {ws}/missing", "does not exist"),
    ("train-reflow-without-pairs (defect 4)", "train --objective reflow", "pairs"),
    # fmkit train --config FILE.toml: the flags' checks (defect 9)
    ("toml-batch-0 (defect 9)", "train --config {toml}/batch0.toml", "batch_size must be >= 1"),
    ("toml-batch-text (defect 9)", "train --config {toml}/batch_text.toml",
     "batch_size must be an integer"),
    ("toml-lr-negative (defect 9)", "train --config {toml}/lr.toml", "lr must be > 0"),
    ("toml-grad-accum-0 (defect 9)", "train --config {toml}/accum.toml", "grad_accum must be >= 1"),
    ("toml-device-gpu (defect 9)", "train --config {toml}/device.toml", "device must be one of"),
    ("toml-opts-text (defect 9)", "train --config {toml}/opts.toml", "backbone_opts must be a table"),
    ("toml-hflip-no (defect 9)", "train --config {toml}/hflip.toml", "hflip must be true or false"),
    ("toml-ema-2 (defect 9)", "train --config {toml}/ema.toml", "ema_decay must be between 0 and 1"),
    ("toml-max-steps-negative (defect 9)", "train --config {toml}/steps.toml",
     "max_steps must be >= 1"),
    ("toml-unknown-key", "train --config {toml}/unknown.toml", "unknown key 'colour'"),
    ("toml-syntax", "train --config {toml}/broken.toml", "broken.toml"),
    ("toml-huge-seed", "train --config {toml}/seed.toml", "seed must be between"),
    # fmkit sample
    ("sample-missing-checkpoint", "sample --checkpoint {ws}/missing", "does not exist"),
    ("sample-huge-seed (defect 11)", "sample --seed 99999999999999999999", "--seed"),
    ("sample-cond-file-png (defect 11)", "sample --cond-file {png}", "not a text file"),
    ("sample-guidance-unconditional (defect 11)", "sample --guidance 2", "unconditional"),
    ("sample-trajectory-1 (defect 11)", "sample --trajectory 1", "K >= 2"),
    ("sample-solver-unknown", "sample --solver nope", "unknown solver 'nope'"),
    ("sample-power-degenerate (defect 5)",
     "sample --solver-opt schedule=power --solver-opt power=1e6", "distinct finite steps"),
    ("sample-shift-infinite (defect 5)", "sample --solver-opt shift=1e999", "finite"),
    ("sample-shift-tiny (defect 5)", "sample --solver-opt shift=1e-300", "distinct finite steps"),
    ("sample-rho-infinite (defect 5)", "sample --solver-opt schedule=edm --solver-opt rho=1e999",
     "finite"),
    ("sample-into-run (defect 2)", "sample --output {run}", "holds a training run"),
    ("sample-unknown-class", "sample --checkpoint {classes_run} --cond class=green",
     "unknown class 'green'"),
    ("sample-index-out-of-range (defect 11)",
     "sample --checkpoint {classes_run} --cond class=#5", "class=#INDEX"),
    ("sample-cond-unconditional", "sample --cond Smiling=1", "trained without conditions"),
    ("sample-interval-backwards", "sample --checkpoint {classes_run} --guidance-interval 0.9,0.1",
     "LO <= HI"),
    ("sample-pickle", "sample --checkpoint {pickle}", "unpickling"),
    ("sample-guidance-infinite", "sample --checkpoint {classes_run} --guidance inf", "--guidance"),
    ("sample-steps-0", "sample --steps 0", "--steps"),
    ("sample-cond-file-and-count", "sample --checkpoint {classes_run} --cond-file {condfile} "
     "--num-samples 3", "drop --cond"),
    ("sample-solver-opt-unknown", "sample --solver-opt nonsense=1", "unknown option 'nonsense'"),
    # fmkit prepare
    ("prepare-over-input (defect 1)", "prepare folder --data-dir {faces} --out {faces}",
     "overlap"),
    ("prepare-inside-input (defect 1)", "prepare folder --data-dir {faces} --out {faces}/sub",
     "overlap"),
    ("prepare-into-user-folder (defect 1)", "prepare folder --data-dir {faces} --out {user}",
     "is not empty"),
    ("prepare-into-run", "prepare folder --data-dir {faces} --out {run}", "holds a training run"),
    ("prepare-unknown-dataset", "prepare nope --out {ws}/p", "unknown dataset 'nope'"),
    ("prepare-missing-images", "prepare folder --data-dir {ws}/missing --out {ws}/p",
     "does not exist"),
    # fmkit export
    ("export-into-run (defect 2)", "export --checkpoint {run} --out {run}", "holds a training run"),
    ("export-fp16-onnx", "export --checkpoint {run} --out {ws}/e --format onnx --fp16", "--fp16"),
    ("export-into-user-folder", "export --checkpoint {run} --out {user}", "is not empty"),
    ("export-format-unknown", "export --checkpoint {run} --out {ws}/e --format tflite", "tflite"),
    ("export-from-user-folder", "export --checkpoint {user} --out {ws}/e", "no readable checkpoint"),
    # fmkit reflow
    ("reflow-missing-teacher", "reflow --teacher {ws}/missing --num-pairs 4 --out {ws}/r",
     "does not exist"),
    ("reflow-into-prepared", "reflow --teacher {run} --num-pairs 4 --out {prepared}",
     "holds a prepared array"),
    ("reflow-no-pairs", "reflow --teacher {run} --num-pairs 0 --out {ws}/r", "--num-pairs"),
    ("reflow-guidance-unconditional (defect 11)",
     "reflow --teacher {run} --num-pairs 4 --out {ws}/r --guidance 2", "unconditional"),
    # fmkit demo
    ("demo-device-gpu (defect 11)", "demo --checkpoint {run} --device gpu", "--device"),
    ("demo-pickle", "demo --checkpoint {pickle}", "unpickling"),
    ("demo-port-range", "demo --checkpoint {run} --port 70000", "--port"),
    # fmkit eval
    ("eval-metric-unknown", "eval fid --checkpoint {run} --metrics nope", "unknown metric 'nope'"),
    ("eval-json-over-user-file", "eval fid --checkpoint {run} --json {user}/a.tex",
     "not an fmkit evaluation record"),
    ("eval-cond-unconditional (defect 12)", "eval fid --checkpoint {run} --cond Smiling=1",
     "unconditional"),
    ("eval-cond-and-sampling (defect 12)",
     "eval fid --checkpoint {classes_run} --cond class=red --cond-sampling data",
     "drop --cond-sampling"),
    ("eval-sweep-into-run", "eval sweep --checkpoint {run} --out {run}", "holds a training run"),
    ("eval-nll-solver-unknown", "eval nll --checkpoint {run} --solver nope",
     "unknown solver 'nope'"),
    # the rest
    ("show-unknown", "show backbones nope", "unknown backbone 'nope'"),
    ("list-unknown-kind", "list nope", "nope"),
    ("command-unknown", "nocommand", "nocommand"),
    ("list-conditions-pickle", "list-conditions --checkpoint {pickle}", "unpickling"),
]  # fmt: skip

# What a case's command gets when it names none of these itself (so a mistake is the only
# thing wrong with it, and it could only write inside the workspace).
DEFAULTS = {
    "train": "--dataset folder --data-dir {faces} --image-size 16 --batch-size 4 --max-steps 1 "
    "--output {ws}/out",
    "sample": "--checkpoint {run} --output {ws}/samples --steps 2",
}

TOML = {
    "batch0": "batch_size = 0",
    "batch_text": 'batch_size = "4"',
    "lr": "lr = -1.0",
    "accum": "grad_accum = 0",
    "device": 'device = "gpu"',
    "opts": 'backbone_opts = "x"',
    "hflip": 'hflip = "no"',
    "ema": "ema_decay = 2.0",
    "steps": "max_steps = -3",
    "unknown": 'colour = "red"',
    "broken": "batch_size = = 3",
    "seed": "seed = 99999999999999",
}


def tree(root):
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("mistakes")
    paths = {"ws": root, "faces": root / "faces", "user": root / "user", "toml": root / "toml"}
    for i in range(8):
        write_image(root / "faces" / f"{i}.png", size=(16, 16), color=(30 * i, 90, 200))
        write_image(root / "classes" / ("red" if i % 2 else "blue") / f"{i}.png", size=(16, 16))
    (root / "user").mkdir()
    (root / "user" / "a.tex").write_text("\\documentclass{article}\n")
    (root / "toml").mkdir()
    for name, text in TOML.items():
        (root / "toml" / f"{name}.toml").write_text(text + "\n")
    paths["png"] = write_image(root / "cond.png", size=(4, 4))
    paths["condfile"] = root / "conditions.txt"
    paths["condfile"].write_text("class=red\nclass=blue\n")
    paths["pickle"] = root / "model.pt"
    torch.save({"w": torch.ones(2)}, paths["pickle"])

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    paths["run"] = root / "run"
    run(*train_args(paths["faces"], paths["run"], "--max-steps", 1))
    paths["classes_run"] = root / "classes_run"
    run(*train_args(root / "classes", paths["classes_run"], "--max-steps", 1, "--condition",
                    "class"))  # fmt: skip
    paths["model"] = root / "model"
    run("export", "--checkpoint", paths["run"], "--out", paths["model"])
    paths["prepared"] = root / "prepared"
    run("prepare", "folder", "--data-dir", paths["faces"], "--image-size", 16, "--out",
        paths["prepared"])  # fmt: skip
    return paths


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("line, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(line, expected, ws, run_cli, monkeypatch):
    monkeypatch.chdir(ws["ws"])  # a relative default output would land in the workspace
    command = line.split()[0]
    if command in DEFAULTS:
        named = {word for word in line.split() if word.startswith("--")}
        defaults = DEFAULTS[command].split()
        kept = []
        for i, word in enumerate(defaults):  # the defaults whose flag the case does not set
            if word.startswith("--") and word not in named:
                kept += [word, defaults[i + 1]]
        line = f"{line} {' '.join(kept)}"
        if command == "train":
            line += " " + " ".join(TINY)
    args = [word.format(**ws) for word in line.split()]
    before = tree(ws["ws"])
    error = one_line_error(run_cli(*args))
    assert expected in error, error
    assert len(error) < 400, error
    assert tree(ws["ws"]) == before
