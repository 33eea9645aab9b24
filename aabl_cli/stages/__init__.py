"""The commands' work, one module (or package) per stage: scan, split, train, evaluate, poison,
report, and run and demo, which compose them.

A stage imports `aabl_cli.core` and no other stage; run and demo alone compose stages
(tests/test_layers.py checks it). Each is an importable function with keyword-only options.
"""
