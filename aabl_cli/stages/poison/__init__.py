"""`aabl poison`: write a poisoned copy of a clean image folder, with its ground truth, for evaluation.

`backdoors/` holds the paper's seven backdoors (one module each) and `BACKDOORS`, the registry
`--backdoor` chooses from; `folder.py` copies the folder and triggers the chosen images.
"""

from aabl_cli.stages.poison.backdoors import BACKDOORS, Backdoor
from aabl_cli.stages.poison.backdoors.blend import blend_trigger, load_pattern, resize_pattern
from aabl_cli.stages.poison.backdoors.patches import badnets_trigger, trojan_trigger
from aabl_cli.stages.poison.folder import (
    CSV_COLUMNS,
    TRIGGER_FILE,
    poison_folder,
    resolve_target,
    select_noise,
    select_poisoned,
)

__all__ = ["BACKDOORS", "CSV_COLUMNS", "TRIGGER_FILE", "Backdoor", "badnets_trigger", "blend_trigger", "load_pattern",
           "poison_folder", "resize_pattern", "resolve_target", "select_noise", "select_poisoned", "trojan_trigger"]
