"""Augmentation: on-the-fly traditional transforms and offline strategies that enlarge the training set."""
from diffmed.augment.strategies import (
    MANIFEST, PRODUCERS, STRATEGIES, THESIS_MAJORITY_FRACTION, THESIS_MINORITY_COPIES, AugmentPlan,
    GeneratorProducer, ManifestProducer, MixedProducer, Producer, TraditionalProducer, boundary_distances,
    build_augmented_train, check_train_set, features_from_run, make_producer, misclassified_candidates,
    plan_balanced, plan_from_sources, plan_misclassified, plan_strategy, plan_unbalanced, write_manifest,
)
from diffmed.augment.transforms import COMBINED, POLICIES, TRADITIONAL, build_transform

__all__ = [
    "AugmentPlan", "COMBINED", "GeneratorProducer", "MANIFEST", "ManifestProducer", "MixedProducer", "POLICIES",
    "PRODUCERS", "Producer", "STRATEGIES", "THESIS_MAJORITY_FRACTION", "THESIS_MINORITY_COPIES", "TRADITIONAL",
    "TraditionalProducer", "boundary_distances", "build_augmented_train", "build_transform", "check_train_set",
    "features_from_run", "make_producer", "misclassified_candidates", "plan_balanced", "plan_from_sources", "plan_misclassified",
    "plan_strategy", "plan_unbalanced", "write_manifest",
]
