"""Training of the hierarchy (level pairs, the chunk autoencoder) and of the LM projector."""
