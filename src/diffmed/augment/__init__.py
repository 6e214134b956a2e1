"""Augmentation: on-the-fly traditional transforms and offline strategies that enlarge the training set."""
from diffmed.augment.strategies import (
    AUGMENT_FILE, MANIFEST, PRODUCERS, STRATEGIES, THESIS_MAJORITY_FRACTION, THESIS_MINORITY_COPIES, AugmentPlan,
    AugmentResult, GeneratorProducer, ManifestProducer, MisclassifiedSelection, MixedProducer, Producer,
    TraditionalProducer, augment_to_manifest, boundary_distances, build_augmented_train, check_augment_options,
    check_train_set, features_from_run, make_producer, misclassified_candidates, plan_balanced, plan_from_sources,
    plan_misclassified, plan_strategy, plan_unbalanced, read_manifest, select_misclassified, write_manifest,
)
from diffmed.augment.transforms import COMBINED, POLICIES, TRADITIONAL, build_transform

__all__ = [
    "AUGMENT_FILE", "AugmentPlan", "AugmentResult", "COMBINED", "GeneratorProducer", "MANIFEST", "ManifestProducer",
    "MisclassifiedSelection", "MixedProducer", "POLICIES", "PRODUCERS", "Producer", "STRATEGIES",
    "THESIS_MAJORITY_FRACTION", "THESIS_MINORITY_COPIES", "TRADITIONAL", "TraditionalProducer", "augment_to_manifest",
    "boundary_distances", "build_augmented_train", "build_transform", "check_augment_options", "check_train_set",
    "features_from_run", "make_producer", "misclassified_candidates", "plan_balanced", "plan_from_sources",
    "plan_misclassified", "plan_strategy", "plan_unbalanced", "read_manifest", "select_misclassified",
    "write_manifest",
]
