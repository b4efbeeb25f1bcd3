"""Exit statuses of the ``peftlab`` command.

0 when training completed or was stopped; 1 when it stopped on a non-finite loss (the outputs are
still written); 2 for a usage error (a bad name or value: one message on stderr, never a
traceback); 130 after Ctrl-C (the outputs of the finished steps are written).
"""

EXIT_OK, EXIT_NAN, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
