"""sasha_env: slides, features, the Sasha-WSI-v0 environment and the ``sasha`` command line."""

__version__ = "0.1.0"


def _register() -> None:
    """Register ``Sasha-WSI-v0`` with Gymnasium (once; ``gymnasium.make`` imports the env lazily)."""
    import gymnasium

    if "Sasha-WSI-v0" not in gymnasium.registry:
        gymnasium.register(id="Sasha-WSI-v0", entry_point="sasha_env.envs.wsi:SashaWSIEnv")


_register()
