"""`aabl report`: one self-contained HTML page about a work directory, for a person deciding
whether to trust the split: `inputs.py` reads it, `gallery.py` draws the most suspicious
isolated images with saliency maps, `html.py` renders the page, `page.py` puts it together.
"""

from aabl_cli.stages.report.gallery import choose_gallery, gradient_saliency, overlay_pair
from aabl_cli.stages.report.inputs import read_inputs
from aabl_cli.stages.report.page import confusion, report

__all__ = ["choose_gallery", "confusion", "gradient_saliency", "overlay_pair", "read_inputs", "report"]
