"""Data: datasets from files (npz, IDX, CIFAR binaries, image folders), downloads, augmentation."""
