"""Unlearnable examples: the MTL-UE generator loop, objectives, baselines, export and publishing (docs/method.md section 4-6)."""
