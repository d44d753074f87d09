"""Tools a user runs beside the recipe, each as `python -m tools.NAME`: hard-negative mining
(mine), the planner behind the dry run (plan), the one-GPU check (gpu_check), the tiny
preset's ablation runner (ablate)."""
