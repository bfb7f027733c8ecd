"""sasha_models — the SASHA model zoo. Imports nothing from ``sasha_env``.

Works on tensors and on the small :class:`~sasha_models.data.BagSource` interface. Import
from the modules (importing this package loads nothing heavy):

- :mod:`sasha_models.attention` — the one masked-attention helper (gated attention, masked
  softmax, ACMIL's random top-K masking);
- :mod:`sasha_models.hafed` — HAFED and its slide-level classifier; :mod:`sasha_models.tsu` —
  the targeted state updater; :mod:`sasha_models.baselines` — ABMIL, mean/max MIL, TransMIL;
- :mod:`sasha_models.incremental` — the classifier re-scoring only changed rows;
- :mod:`sasha_models.actor_critic` — the SASHA actor-critic network (tensors in, logits and
  values out) and its action masks; :mod:`sasha_models.policy` — the SB3 / sb3-contrib policies
  that wrap it; :mod:`sasha_models.ppo_config` — the official PPO hyper-parameters;
  :mod:`sasha_models.projection` — the fixed projection compact observations read through;
- :mod:`sasha_models.data`, :mod:`sasha_models.metrics`, :mod:`sasha_models.lit` (Lightning
  training), :mod:`sasha_models.checkpoint` (exported ``model.pt`` files, no Lightning).
"""
