"""The randomness of a training step is addressed by global slot: every world size and accumulation gives
each slot the same (t, noise, label drop), and a rank draws only its own slots."""

import torch

from ddpm_dist.config import load_config
from ddpm_dist.diffusion import make_schedule
from ddpm_dist.models import build_model
from ddpm_dist.parallel.engine import Engine
from ddpm_dist.training import loop
from ddpm_dist.training.randomness import rank_slots, slot_randomness

SHAPE = (3, 8, 8)
GLOBAL = 16


def by_slot(world_size: int, accum: int) -> dict[int, tuple]:
    """What every rank of this layout draws at step 7, keyed by global slot."""
    micro = GLOBAL // (world_size * accum)
    out = {}
    for rank in range(world_size):
        for i in range(accum):
            slots = rank_slots(i, rank, world_size, micro)
            t, drop, noise = slot_randomness(3, 7, slots, 1000, SHAPE, 0.3, torch.device("cpu"))
            assert len(t) == len(drop) == len(noise) == micro  # only its own slots
            for k, s in enumerate(slots):
                assert s not in out
                out[s] = (int(t[k]), bool(drop[k]), noise[k])
    assert sorted(out) == list(range(GLOBAL))
    return out


def test_every_slot_draws_the_same_for_world_sizes_1_2_4_and_accumulation():
    ref = by_slot(1, 1)
    for world_size, accum in [(2, 1), (4, 1), (2, 2), (1, 4)]:
        got = by_slot(world_size, accum)
        for s in range(GLOBAL):
            assert got[s][:2] == ref[s][:2]
            assert torch.equal(got[s][2], ref[s][2])
    ts = [ref[s][0] for s in range(GLOBAL)]
    noise = torch.stack([ref[s][2] for s in range(GLOBAL)])
    assert len(set(ts)) > GLOBAL // 2 and abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    assert 0 < sum(ref[s][1] for s in range(GLOBAL)) < GLOBAL  # dropout 0.3 drops some, not all
    other_step = slot_randomness(3, 8, range(GLOBAL), 1000, SHAPE, 0.3, torch.device("cpu"))[2]
    assert not torch.allclose(other_step, noise)


def test_a_training_step_asks_only_for_its_ranks_slots(monkeypatch):
    """run_step of rank 2 of 4 with 2 micro-steps of 3: slots 6-8 and 18-20, nothing else is drawn."""
    asked = []

    def spy(seed, step, slots, *args):
        asked.append(list(slots))
        return slot_randomness(seed, step, slots, *args)

    monkeypatch.setattr(loop, "slot_randomness", spy)
    cfg = load_config(None, ["model.preset=tiny", "model.num_classes=4", "train.label_dropout=0.5"])
    engine = Engine(build_model(cfg.model), torch.device("cpu"), {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0})
    batch = {"image": torch.zeros(3, 3, 16, 16), "label": torch.zeros(3, dtype=torch.long)}
    loop.run_step(
        engine,
        make_schedule("linear", 100),
        [batch, batch],
        step=5,
        rank=2,
        world_size=4,
        recipe=loop.StepRecipe.of(cfg, 4),
        lr=1e-3,
    )
    assert asked == [[6, 7, 8], [18, 19, 20]]
