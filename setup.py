"""tmdiff: tri-modal (text, image, audio) masked diffusion pretraining in JAX."""
from setuptools import find_packages, setup

setup(
    name="tmdiff",
    version="0.1.0",
    description="JAX-native pretraining stack for tri-modal masked diffusion models",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tmdiff", "tmdiff.*"]),
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.14",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.7",
        "tensorstore>=0.1.70",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.7",
        "sentencepiece>=0.2",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
    ],
    entry_points={"console_scripts": ["tmdiff=tmdiff.__main__:main"]},
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        # Tested together: seqio 0.0.20, TensorFlow 2.21.0, tensorflow-text 2.21.1 with jax
        # 0.10.2, numpy 2.4.6, protobuf 7.36.2 on Python 3.11 (TensorFlow adds ~2 GB).
        "seqio": ["seqio>=0.0.20,<0.1", "tensorflow>=2.21,<2.22", "tensorflow-text>=2.21,<2.22"],
    },
)
