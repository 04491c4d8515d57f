"""The run-and-report ring: a run's description (``spec``), its execution (``execute``), the batch loop
(``engine``), the results files (``schema``, ``report``, ``plots``) and grids of runs (``sweep``)."""
