"""What every stage stands on: data, models, losses, adversarial attacks, the training loop,
checkpoints, the work directory, devices and processes, files, text.

Nothing here imports a stage (`aabl_cli.stages`); tests/test_layers.py checks it.
"""
