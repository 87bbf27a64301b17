"""The arms several claims share: the chosen recipe with retrieval (k = 4) at 600 and 1600
steps. They are the shipped demo model's trajectory (src/rdm/assets/demo-fashion) at those steps:
the 1600-step EMA was the shipped model until that model was continued to 2400 steps."""

from __future__ import annotations

from claims import Arm

RDM_600 = Arm("rdm-k4-600", steps=600)
RDM_1600 = Arm("rdm-k4-1600", steps=1600, continues=RDM_600)
