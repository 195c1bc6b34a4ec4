"""Unlearnable examples: the MTL-UE generator loop, objectives, baselines and export (SPEC 4-6)."""
