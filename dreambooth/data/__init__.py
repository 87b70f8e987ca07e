"""Training data: JumpStart-format folders, subjects, class images for prior preservation, the latent cache."""
