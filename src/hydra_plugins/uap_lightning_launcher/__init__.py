"""uap_lightning's Hydra launcher (Hydra finds launchers in the ``hydra_plugins`` namespace)."""
