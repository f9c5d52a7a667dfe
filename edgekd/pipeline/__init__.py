"""The pipeline, one stage per module, each taking the previous stage's artifact:

``teachers`` (train a float model; find the teacher a run uses) -> ``distill`` (a run directory) ->
``deploy`` (a bundle: export + compile + parity; the on-device compile) ; ``sweep`` runs the three
for several bit widths and methods and benches each bundle.
"""
