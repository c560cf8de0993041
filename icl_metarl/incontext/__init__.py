"""The in-context learner: histories, training windows, the Transformer policy, its agent, pretraining."""
