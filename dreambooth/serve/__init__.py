"""Images from a trained model: `dreambooth generate`."""
