"""``python -m clipft.models CHECKPOINT [--model NAME] [--tag TAG]``: store a checkpoint's
model as weights shipped with clipft (see ``clipft/models/shipped.py``)."""

from clipft.models.shipped import main

main()
