"""voco: reproducible VoCo (Volume Contrast) pre-training for 3D medical images."""

from voco import runtime as _runtime

# first, before anything imports torch: OpenMP waiting and malloc settings of this process (see voco.runtime)
_runtime.configure()

__version__ = "0.1.0"
