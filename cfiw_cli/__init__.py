"""cfiw: counterfactual importance weighting for policy-gradient fine-tuning on GSM8K."""

__version__ = "0.1.0"
