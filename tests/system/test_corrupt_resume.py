"""One byte flipped in the newest checkpoint of a trained run, from the command line: `checkpoints verify` names it
(exit 2), `sample --run` refuses it (exit 2, one line), and `train` again resumes from the previous checkpoint with
one line naming the file, replaying the steps after it exactly (the same losses as the first time)."""

import json
import os

from tests.support.train_helpers import run_module, run_train

OPTS = ["checkpoint.every_images=32", "train.log_every=1"]  # checkpoints at steps 2 and 4, every loss logged


def losses(run) -> list:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [(row["step"], row["loss"]) for row in rows if row["event"] == "train"]


def test_a_flipped_byte_is_caught_everywhere_and_training_resumes_from_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(run, 4, *OPTS)
    first = dict(losses(run))
    newest = run / "checkpoints" / "step_000000004" / "__0_0.distcp"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))

    r = run_module("ddpm_dist.checkpoints", "verify", run)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["OK", "checkpoints/step_000000002"],
        ["CORRUPT", "checkpoints/step_000000004"],
        ["OK", "export.safetensors"],
    ], lines
    assert f"'{newest}' is altered" in lines[1]

    r = run_module("ddpm_dist.sample", "--run", run, "--out", tmp_path / "s", "--num-images", 2, "--steps", 2)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: corrupt checkpoint"), r.stderr
    assert str(newest) in r.stderr
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")  # nothing sampled from wrong weights

    r = run_train(run, 6, *OPTS)
    said = [line for line in r.stderr.splitlines() if "is corrupt" in line]
    assert len(said) == 1 and str(newest) in said[0] and "falling back to step_000000002" in said[0], said
    assert f"resumed from {run}/checkpoints/step_000000002 (step 2, 32 images" in r.stderr
    replayed = losses(run)[len(first) :]
    assert [s for s, _ in replayed] == [3, 4, 5, 6]
    assert dict(replayed[:2]) == {3: first[3], 4: first[4]}  # resumed from step 2's exact state
    assert sorted(os.listdir(run / "checkpoints")) == ["corrupt-step_000000004", "step_000000004", "step_000000006"]

    r = run_module("ddpm_dist.checkpoints", "verify", run)
    assert r.returncode == 2 and [line.split()[0] for line in r.stdout.splitlines()] == ["OK", "OK", "CORRUPT", "OK"]
