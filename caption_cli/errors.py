"""Exceptions the library raises; the CLI maps them to one-line messages and exit codes."""

from __future__ import annotations


class CaptionCliError(Exception):
    """Base class: the message is shown to the user as is, on one line."""


class BundleError(CaptionCliError):
    """A model bundle is missing, incomplete, tampered with or of an unknown format."""


class ImageError(CaptionCliError):
    """One image could not be read; the run records it and goes on."""


class StoreError(CaptionCliError):
    """The caption database cannot be opened or written."""


class MetadataError(CaptionCliError):
    """Metadata could not be written or verified for one file."""


class DatasetError(CaptionCliError):
    """A caption data set file is malformed (names file, line and cause)."""


class MissingExtraError(CaptionCliError):
    """A command needs an optional dependency (torch for train/export)."""
