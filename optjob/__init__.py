"""optjob: a self-hosted model-optimization job runner that speaks SageMaker's optimization-job API."""

__version__ = "0.1.0"
