"""Privacy: differential privacy and secure aggregation."""
