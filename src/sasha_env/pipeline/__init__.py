"""Pipeline: the stage registry, the cached and resumable runner, evaluation and figures."""
