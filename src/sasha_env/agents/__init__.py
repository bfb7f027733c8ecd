"""Agents: SB3 agents on ``Sasha-WSI-v0``, zoom policies and running episodes.

- :mod:`~sasha_env.agents.config` — how agents are trained (``AgentConfig``); no SB3 import;
- :mod:`~sasha_env.agents.envs` — the environments agents train and act in, and
  ``load_agent``, the one way a trained agent comes back;
- :mod:`~sasha_env.agents.train` — ``train_agent``, with :mod:`~sasha_env.agents.callbacks`
  (the learning curve, validation selection), :mod:`~sasha_env.agents.protocol` (the paper's
  slide-ordered protocol) and :mod:`~sasha_env.agents.buffers` (row-pooled rollouts);
- :mod:`~sasha_env.agents.export` — agents as weights-only tensors plus JSON;
- :mod:`~sasha_env.agents.episodes` — zoom policies (agent, random, attention) and
  ``run_episodes``;
- :mod:`~sasha_env.agents.selection` — the validation criterion (statistics over runs are in
  :mod:`sasha_models.stats`).
"""
