"""Nodes, rules, received instances and deliveries (issue 3)."""
