"""Models: the built-in nets (all take [0,1] inputs and normalise inside) and user model factories."""
