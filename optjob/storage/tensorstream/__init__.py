"""Safetensors streamed tensor by tensor between S3 and a job: ranged reads, planned headers, multipart writes.

``reader`` reads a source shard with ranged GETs a bounded window ahead; ``header`` parses a header
or computes an output one before the data exists; ``writer`` holds a producer to that plan;
``multipart`` uploads the bytes as parts while they are produced. Together they let a job touch a
5 GB shard a few megabytes at a time, and any technique that maps tensors to tensors (quantization
now; sharding and resumable units next) can use them.
"""
