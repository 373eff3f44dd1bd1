"""Speculative decoding: EAGLE-3 heads trained for the target, or a draft model the user brings."""

from optjob.techniques.speculative import technique as technique  # registers the plug-in
