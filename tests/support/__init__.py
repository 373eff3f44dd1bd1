"""Helpers the tests share (servers, browsers, models); no tests live here."""
