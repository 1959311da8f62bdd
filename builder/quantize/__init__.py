"""Quantization for engines: FP8 (`fp8`) and NVFP4 (`nvfp4`) Q/DQ graphs calibrated with NVIDIA Model
Optimizer, what both share (`common`), and calibration on recorded calls (`calibration`)."""
