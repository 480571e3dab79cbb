"""Models to decompose, their data distributions, and (for toys) their ground truth."""

from unmerge.targets.base import GroundTruth, Target
from unmerge.targets.toys import cached_target, load_target, save_target, target_name, train_target

__all__ = ["GroundTruth", "Target", "cached_target", "load_target", "save_target", "target_name", "train_target"]
