"""Checkpoints are data, never code (docs/SECURITY.md): a checkpoint whose pickles would run code is refused, with
one line naming the file, by every command that reads one (resume, sample, evaluate, viz), and the code never runs.
Each attack is a genuine committed checkpoint with one file rewritten to create a marker file when unpickled."""

import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from tests.support.common import PYTHON
from tests.support.train_helpers import final_checkpoint, run_module, run_train

ZERO = ["parallel.backend=zero"]  # ZeRO-2 in one process


class RunCode:
    """Pickled as builtins.exec(...): plain unpickling creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    run_train(run, 2)
    return run


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("zero") / "run"
    run_train(run, 2, *ZERO)
    return run


def copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, final_checkpoint(dst)


def assert_refused(r, file, marker, why="refusing to load"):
    assert r.returncode != 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and why in line and f"'{file}'" in line, r.stderr[-2000:]
    assert not os.path.exists(marker)


def read_metadata(ckpt):
    from ddpm_dist.artifacts.safe_dcp import read_dcp_metadata

    return read_dcp_metadata(os.path.join(ckpt, ".metadata"))  # genuine, so the restricted reader admits it


def reseal(ckpt):
    """Record the tampered files' digests in the marker, as an attacker who can write the files can: the digests
    catch corruption (test_checkpoint_digests), and the refusal tested here must hold without them."""
    from ddpm_dist.artifacts.digests import MARKER, file_record, read_marker

    marker = read_marker(ckpt)
    marker["files"] = {name: file_record(os.path.join(ckpt, name)) for name in marker["files"]}
    with open(os.path.join(ckpt, MARKER), "w") as f:
        json.dump(marker, f)


def write_metadata(ckpt, md):
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    reseal(ckpt)
    return os.path.join(ckpt, ".metadata")


COMMANDS = {
    "resume": lambda run, out: run_train(run, 4, check=False),
    "sample": lambda run, out: run_module("ddpm_dist.sample", "--run", run, "--out", out, "--num-images", 2),
    "evaluate-frechet": lambda run, out: run_module(
        "ddpm_dist.evaluate", "frechet", "--run", run, "--num-images", 2, "--out", out / "f.json"
    ),
    "viz-compare": lambda run, out: run_module(
        "ddpm_dist.viz", "compare", "--run", run, "--samplers", "ddim:2", "--num-images", 1, "--out", out / "c.png"
    ),
    "viz-forward-reverse": lambda run, out: run_module(
        "ddpm_dist.viz", "forward-reverse", "--run", run, "--num-images", 1, "--steps", 2, "--out", out / "f.png"
    ),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_dcp_metadata_that_runs_code_is_refused(single_run, tmp_path, command):
    run, ckpt = copy_run(single_run, tmp_path)
    marker = tmp_path / "MARKER"
    md = read_metadata(ckpt)
    md.storage_meta.modules = [RunCode(marker)]
    file = write_metadata(ckpt, md)
    r = COMMANDS[command](run, tmp_path / "out")
    assert_refused(r, file, marker, "it references builtins.exec")
    if command == "resume":
        # The control: the file this test crafted (in tmp_path) is a real attack, since plain unpickling runs it.
        # Deliberate and the only pickle.load in the project, in a child process so the code runs outside pytest.
        subprocess.run([PYTHON, "-c", f"import pickle; pickle.load(open({file!r}, 'rb'))"], check=True)
        assert os.path.exists(marker)


def redirect(ckpt, fqn, payload, as_bytes=False):
    """Point checkpoint entry `fqn` at a file of our own holding torch.save(payload); with only DCP's metadata
    classes in .metadata, so the metadata itself is admitted."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    evil = os.path.join(ckpt, "evil.distcp")
    torch.save(payload, evil)
    info = _StorageInfo("evil.distcp", 0, os.path.getsize(evil))
    md = read_metadata(ckpt)
    if as_bytes:
        md.state_dict_metadata[fqn] = BytesStorageMetadata()
    for index in [i for i in md.storage_data if i.fqn == fqn] + [MetadataIndex(fqn)]:
        md.storage_data[index] = info
    write_metadata(ckpt, md)
    return evil


def test_dcp_byte_entries_are_loaded_weights_only(single_run, tmp_path):
    """DCP keeps non-tensor leaves (the optimizer's param_groups) as torch.save bytes and would load them with
    weights_only=False; a tensor declared as bytes would reach that path from sample/evaluate/viz too."""
    from ddpm_dist.artifacts import CheckpointError, load_checkpoint_weights

    run, ckpt = copy_run(single_run, tmp_path)
    marker = tmp_path / "MARKER"
    evil = redirect(ckpt, "engine.optim.param_groups.0.lr", RunCode(marker))
    assert_refused(run_train(run, 4, check=False), evil, marker, "it references builtins.exec")

    ema_key = next(k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("ema."))
    redirect(ckpt, ema_key, RunCode(marker), as_bytes=True)
    with pytest.raises(CheckpointError, match=f"refusing to load '{evil}': it holds '{ema_key}' as pickled bytes"):
        load_checkpoint_weights(str(run))
    assert not os.path.exists(marker)


def test_dcp_metadata_naming_files_outside_the_checkpoint_is_refused(single_run, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from ddpm_dist.artifacts import CheckpointError, load_checkpoint_weights

    run, ckpt = copy_run(single_run, tmp_path)
    md = read_metadata(ckpt)
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("../../config.yaml", 0, 10)
    file = write_metadata(ckpt, md)
    with pytest.raises(CheckpointError, match=f"refusing to load '{file}': not DCP metadata of files in its own"):
        load_checkpoint_weights(str(run))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_deepspeed_file_that_runs_code_is_refused(zero_run, tmp_path, name):
    """DeepSpeed's own loader is torch.load(weights_only=False); resume reads its files with weights_only=True and
    only the classes DeepSpeed writes."""
    from ddpm_dist.parallel.zero import deepspeed_globals

    run, ckpt = copy_run(zero_run, tmp_path)
    marker = tmp_path / "MARKER"
    file = os.path.join(ckpt, "engine", "zero", name)
    with torch.serialization.safe_globals(deepspeed_globals()):
        state = torch.load(file, weights_only=True)
    state["extra"] = RunCode(marker)
    torch.save(state, file)
    reseal(ckpt)
    assert_refused(run_train(run, 4, *ZERO, check=False), file, marker, "it references builtins.exec")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(file)  # the attack is real: DeepSpeed's own loader runs it
    assert os.path.exists(marker)


@pytest.mark.parametrize("backend", ["single", "zero"])
def test_genuine_checkpoints_still_resume(single_run, zero_run, tmp_path, backend):
    run, ckpt = copy_run(single_run if backend == "single" else zero_run, tmp_path)
    r = run_train(run, 3, *(ZERO if backend == "zero" else []))
    assert f"resumed from {ckpt}" in r.stderr
    assert final_checkpoint(run).endswith("step_000000003")
