"""Datasets: the embedded digits, Fashion-MNIST, ImageFolder trees."""
