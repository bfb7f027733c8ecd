"""Agents: training SB3 agents on ``Sasha-WSI-v0``, zoom policies (agent, random, attention) and running episodes."""
