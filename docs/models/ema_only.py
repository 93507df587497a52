"""Copy an export's EMA weights (not the raw ones) into a smaller export: what docs/models/ ships.

    .venv/bin/python docs/models/ema_only.py runs/digits/export.safetensors docs/models/digits-ema.safetensors
"""
import sys

from ddpm_dist.artifacts import load_export, save_export

src, dst = sys.argv[1:3]
ema, model_config, info = load_export(src, "ema")
save_export(dst, ema, None, model_config, info)
print(f"{dst}: {len(ema)} EMA tensors of {src}")
