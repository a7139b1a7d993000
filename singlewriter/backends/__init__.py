"""Lock backends. Each module imports its own client library on import.

``singlewriter.backends.file`` needs nothing beyond the standard library;
``redis`` needs the ``redis`` extra, and so on.
"""
