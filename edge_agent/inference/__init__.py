"""Inference backends behind one interface: ONNX Runtime everywhere, TensorRT on Jetson GPUs."""
