"""plan: candidates ranked inside the budget, predicted and then pre-measured before training."""
