"""The two ends of a job: bring the source model in (checked, EULA-gated) and publish the result.

Both ends are the storage layer's; this module decides only what the pipeline needs from them:
which URI to fetch, which checks a fetched model must pass before any optimization, and what the
manifest that marks a published model as complete records about the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optjob.errors import InputError
from optjob.pipeline.plan import Plan
from optjob.redaction import redact_tree
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.storage.eula import model_card_gating
from optjob.storage.inputs import check_model_dir, dropped_warning
from optjob.storage.publish import Publisher, PublishResult, publish_model
from optjob.storage.s3 import S3Settings
from optjob.storage.source import FetchedModel, fetch_model

ALLOW_PICKLE_ENV = "OPTJOB_ALLOW_PICKLE_WEIGHTS"


@dataclass
class SourceModel:
    path: Path
    fetched: FetchedModel


def fetch_source(
    plan: Plan,
    work_dir: Path,
    *,
    settings: S3Settings | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
) -> SourceModel:
    """Download the source, refuse unsafe or non-model directories and unaccepted gated licenses."""
    uri = plan.source.s3_uri
    if not uri:
        raise InputError(
            f"ModelSource.SageMakerModel '{plan.source.model_name}' has no registered S3 location; "
            "register it with `optjob models register`"
        )
    fetched = fetch_model(uri, work_dir / "source", settings=settings, events=events, cancel=cancel)
    check_model_dir(fetched.path, allow_pickle=os.environ.get(ALLOW_PICKLE_ENV) == "1")
    if not plan.source.accept_eula:
        reason = model_card_gating(fetched.path)
        if reason:
            raise InputError(reason)
    return SourceModel(path=fetched.path, fetched=fetched)


def build_manifest(
    plan: Plan, job_arn: str, source: SourceModel, metrics: dict[str, Any], warnings: list[str]
) -> dict[str, Any]:
    """What the manifest says about the job; publish adds files, sizes, hashes, versions and timings.

    Secret-looking environment values are redacted (``optjob.redaction``): the manifest is
    published beside the model, for whoever reads the output, not only whoever made the job."""
    return redact_tree(
        {
            "job_name": plan.job_name,
            "job_arn": job_arn,
            "source": {"uri": source.fetched.source_uri, "etags": source.fetched.etags},
            "target": plan.target.name,
            "techniques": [
                {
                    "technique": stage.technique,
                    "optimization_type": stage.optimization_type,
                    "engine": stage.engine,
                    "params": stage.params,
                    "env": stage.env,
                }
                for stage in plan.stages
            ],
            "metrics": metrics,
            "warnings": [*warnings, *dropped_warning(source.fetched.dropped)],
            "recommended_inference_image": plan.recommended_image,
            "plan": plan.model_dump(mode="json"),
        }
    )


def publish_output(
    plan: Plan,
    final_dir: Path,
    manifest: dict[str, Any],
    *,
    settings: S3Settings | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
    publisher: Publisher | None = None,
) -> PublishResult:
    """Upload the verified model directory, manifest last; returns what was published (files, sizes).

    ``publisher``: one that claimed the prefix when the job started (a job of several stages); the
    caller rolls it back on failure."""
    if publisher is not None:
        return publisher.commit(final_dir, manifest)
    return publish_model(
        final_dir,
        plan.output.s3_uri,
        manifest=manifest,
        kms_key_id=plan.output.kms_key_id,
        settings=settings,
        events=events,
        cancel=cancel,
    )
