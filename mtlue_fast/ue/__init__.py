"""Unlearnable examples: the MTL-UE generator loop, objectives, baselines and export (docs/method.md section 4-6)."""
