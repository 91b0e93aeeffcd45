"""Exceptions that other modules classify (torch-free, so that the registry and Dagster can import them)."""


class ModelUnloadableError(ValueError):
    """A saved model can no longer be loaded as it was trained: its base model's fingerprint changed, its
    prompt template or format version is not the one this code renders, or its files are gone.

    The champion gate may replace a champion that fails this way (it could not serve either); any other
    error while re-scoring a champion (out of memory, a locked store) fails the gate instead."""
