"""voco: reproducible VoCo (Volume Contrast) pre-training for 3D medical images."""

__version__ = "0.1.0"
