"""Fine-tuning: objectives of the one training loop that start from a trained model."""
