"""Sub-commands of the ``themask`` CLI (see ``themask.cli``)."""
