"""The per-head representation the passes build and runtimes read: node names, the HeadGraph description, the
split graph's modules and Structure, what the passes leave in ``GraphModule.meta``, and graph utilities.

Nothing here runs a pass, so the passes, ACDC and the analysis all depend on it and it on none of them. Imports
nothing itself: ``pahq_fx.ir.names`` stays free of torch for the command line.
"""
