"""Reproducible Fashion-MNIST training as a library; each DVC stage in ``stages/`` is a thin entry point over it."""

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
