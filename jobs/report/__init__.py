"""``rayalign report``: one self-contained HTML page of a run, a sweep's trials, or runs side by side.

:mod:`.runs` reads what the runs wrote (metrics, config, image grids), :mod:`.plots` draws
the curves with matplotlib, :mod:`.page` decides what goes in which section and writes the
HTML, and :mod:`.command` is the CLI's entry point.
"""
