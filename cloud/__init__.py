"""The Open-AutoGLM Edge control plane: device identity, models, rollouts, alerts and the CLI."""

from edge_agent import __version__

__all__ = ["__version__"]
