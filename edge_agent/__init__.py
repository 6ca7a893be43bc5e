"""The Open-AutoGLM Edge agent: runs fault-prediction models on a device, syncs with the cloud."""

__version__ = "0.1.0"
