"""configs/instances.yaml covers exactly the API's instance enum, with sane capabilities."""

from __future__ import annotations

from optjob.targets.catalog import catalog, instance
from tests.support.botocore_model import shape


def test_catalog_covers_exactly_the_enum() -> None:
    assert set(catalog()) == set(shape("OptimizationJobDeploymentInstanceType")["enum"])


def test_capabilities_follow_the_hardware() -> None:
    for spec in catalog().values():
        if spec.family == "cuda":
            assert spec.capability is not None
            # FP8 tensor cores arrive with Ada/Hopper (sm_89); bf16 with Ampere (sm_80).
            assert spec.fp8 == (spec.capability >= (8, 9)), spec.name
            assert spec.bf16 == (spec.capability >= (8, 0)), spec.name
        else:
            assert spec.neuron_cores == 2 * spec.accelerator_count, spec.name
    assert instance("ml.g4dn.12xlarge").accelerator == "T4"
    assert instance("ml.p4de.24xlarge").memory_gib == 80
    assert instance("ml.p5e.48xlarge").accelerator == "H200"
    assert instance("ml.inf2.48xlarge").neuron_cores == 24
    assert instance("ml.trn1n.32xlarge").accelerator_count == 16
    assert instance("ml.g6e.48xlarge").total_memory_gib == 384
