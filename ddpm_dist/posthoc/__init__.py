"""Post-hoc EMA (EDM2): power-function EMA profiles tracked on the local shards during training (power.py),
their snapshots (snapshots.py), and the reconstruction of any other EMA length from them (reconstruct.py, with
the math in phema.py; `python -m ddpm_dist.ema reconstruct`); the sweep that scores the reconstructions of a
range of stds with the project's Fréchet distance (sweep.py; `python -m ddpm_dist.ema sweep`)."""
