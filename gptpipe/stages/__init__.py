"""The pipeline's stages: the only code that joins the torch packages (problems, sweep, gpt,
evaluation) to the store (``storage``). One module per stage: ``collect``, ``train``, ``evaluate``,
and ``interop`` (import and export); ``flows/`` wraps them for Prefect and the command line."""
