"""What is computed from a model and a guide: the warm-up weight (eq. 20), the training
objectives, L_K by importance sampling, and fitting a second guide to a trained model."""
