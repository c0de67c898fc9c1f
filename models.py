"""Every network of PokéDreamer: v1 (VAE, latent GRU dynamics, RAM probe) and v2 (discrete RSSM, heads, actor, critic)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ===== v1 =====
# (VAE on 40x36 frames, GRU latent dynamics, multi-head RAM probe)

# ===== end v1 =====


# ===== v2 =====
# (discrete RSSM on native 160x144 frames)

# ===== end v2 =====
