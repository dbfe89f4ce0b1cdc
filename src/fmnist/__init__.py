"""Reproducible Fashion-MNIST training: the ETL cycle, the seed's CNN and its tuning, as a library.

Each DVC stage in ``stages/`` is a thin command-line entry point over these modules.
"""

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
