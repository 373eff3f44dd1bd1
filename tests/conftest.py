"""Shared test plumbing: the real S3 server fixtures (SeaweedFS) for every test module."""

pytest_plugins = ["tests.s3server"]
