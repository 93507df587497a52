"""Golden learning curve (issue 28, item 1): the digits recipe of tests/support/golden.py (configs/digits.yaml at
base width 16, batch 32, 240 steps, seed 0) learns as it did when tests/golden/digits.json was written: its loss per
window of 20 steps and the Fréchet distance of a fixed-seed sample (256 images, DDIM-20, from the EMA), in one process.
The 2-process FSDP2 run of the same recipe is measured when the golden file is made (`--controls`, below) and held
inside the tolerance by test_the_tolerance_separates_the_evidence; it is not re-run in every CI run (70 s here), since
FSDP2's steps equal one process's to float tolerance in tests/distributed/test_parallel.py.

Tolerance (tests/support/golden.py): the windows' mean relative loss deviation <= 6%, the worst window <= 20%, the
Fréchet distance within 25%. Measured when the file was written (relative deviations: mean / worst window / Fréchet):
  - an unrelated re-run, one process:           0     / 0     / 0      (bitwise on this CPU)
  - the same run on another CPU (AMD EPYC without AVX-512, 2026-12-03): 6.8e-8 / 1.3e-7 / 16.4% -> inside. The
    losses agree to 1e-7 but the Fréchet distance moved 16.4% (502.5 against 431.6), more than the 2 FSDP2
    processes' 4.8% whose losses differ by 1%: the machine moves the sample's distance at this early stage of
    training, not the training (the cause is not pinned down). The tolerance was 15% before this measurement;
    25% keeps lr x 3 (45.4%) outside, and the loss windows alone catch it too.
  - 2 FSDP2 processes (other reduction order and data layout): 1.2% / 4.9% / 4.8%   -> inside
  - lr x 3 (0.003):                             17.3% / 54.2% / 45.4%  -> outside (it learns faster: a different recipe)
  - seed 1 (information):                       3.7%  / 10.9% / 29.0%  (another run; the test fixes the seed)
  - EMA off (information, ema.halflife_images=1): 0   / 0     / 3.2%   -> inside: NOT caught. The EMA half-life ramps
    with images seen (warmup_ratio), so after 7,680 images it is ~12 steps long and the EMA is nearly the raw weights;
    a recipe short enough for CI cannot tell them apart. The Fréchet distance itself is early-training (~430, the demo
    reaches ~25): it guards against a broken sampler or EMA path more than it measures quality.

Regenerate after an intended recipe change: `.venv/bin/python -m tests.support.golden --controls`, a commit of its own
with the old and new figures (printed) in the message."""

import json

import pytest

from tests.support.golden import GOLDEN, RECIPE, SAMPLE, WINDOW, deviation, measure, within


@pytest.fixture(scope="module")
def golden():
    g = json.load(open(GOLDEN))
    assert (g["recipe"], g["window"], g["sample"]) == (RECIPE, WINDOW, SAMPLE), "recipe changed: regenerate the file"
    return g


def test_the_tolerance_separates_the_evidence(golden):
    """The re-run and the 2 FSDP2 processes fall inside; the changed recipe falls outside."""
    for name, m in golden["measured"].items():
        assert within(m["loss"], m["frechet"], golden), (name, deviation(m["loss"], m["frechet"], golden))
    for name, m in golden["controls"].items():
        assert not within(m["loss"], m["frechet"], golden), (name, deviation(m["loss"], m["frechet"], golden))


def test_one_process_learns_as_the_golden_run(golden, tmp_path):
    m = measure(str(tmp_path), "one")
    assert within(m["loss"], m["frechet"], golden), (deviation(m["loss"], m["frechet"], golden), m)
